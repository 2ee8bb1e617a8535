"""utils/train/loop.py, its parts checked directly: the class names a checkpoint records, the last epoch of a
run, the weights digest, and the tests' fault injection. (The epoch loop itself runs in ``test_main_deit.py``,
``test_main_lvvit.py`` and ``test_cluster.py``.)"""
from __future__ import annotations

import argparse
import hashlib

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from datasets.folder import DatasetError
from utils.common.errors import ConfigError
from utils.train.loop import FaultInjection, class_names, end_epoch_of, weights_digest


class _Folder(TensorDataset):
    """A data set with ImageFolder's ``classes``."""

    def __init__(self, classes):
        super().__init__(torch.zeros(4, 1))
        self.classes = classes


def test_class_names_of_a_folder_through_a_subset():
    assert class_names(_Folder(['cat', 'dog'])) == ['cat', 'dog']
    assert class_names(Subset(_Folder(('a', 'b', 'c')), [0, 2])) == ['a', 'b', 'c']  # the folder's, in label order
    assert class_names(_Folder([3, 1])) == ['3', '1']  # recorded as text


@pytest.mark.parametrize('dataset', [None, TensorDataset(torch.zeros(2)), _Folder([]), _Folder('ab')],
                         ids=['none', 'no-classes', 'empty', 'not-a-list'])
def test_class_names_of_other_sets_are_none(dataset):
    assert class_names(dataset) is None


@pytest.mark.parametrize('epochs,stop,start,end', [(5, None, 0, 5), (5, 3, 0, 3), (5, 9, 2, 5), (5, 3, 2, 3)])
def test_end_epoch_is_the_earlier_of_epochs_and_stop_at_epoch(epochs, stop, start, end):
    assert end_epoch_of(argparse.Namespace(epochs=epochs, stop_at_epoch=stop), start, '') == end


def test_a_run_that_would_train_nothing_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        end_epoch_of(argparse.Namespace(epochs=5, stop_at_epoch=None), 5, 'out/checkpoint.pth')
    assert str(e.value) == ('nothing to train: the run would start at epoch 5 (after out/checkpoint.pth) and end '
                            'before epoch 5 (--epochs 5)')
    with pytest.raises(ConfigError, match=r'start at epoch 2 and end before epoch 2 \(--epochs 5, --stop-at-epoch 2\)'):
        end_epoch_of(argparse.Namespace(epochs=5, stop_at_epoch=2), 2, '')


def test_weights_digest_is_the_sha256_of_names_and_bytes():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    h = hashlib.sha256()
    for key in ('bias', 'weight'):  # sorted by name
        h.update(key.encode())
        h.update(getattr(model, key).detach().numpy().tobytes())
    assert weights_digest(model) == h.hexdigest()
    twin = nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    assert weights_digest(twin) == weights_digest(model)
    with torch.no_grad():
        twin.bias[0] += 1e-6
    assert weights_digest(twin) != weights_digest(model)


# ---------------------------------------------------------------------------------------------- fault injection
def _loader():
    return DataLoader(TensorDataset(torch.zeros(8, 3, 4, 4), torch.arange(8)), batch_size=2)


def test_fault_spec_is_parsed_and_a_bad_one_refused(monkeypatch):
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT', raising=False)
    fault = FaultInjection('1:2:3:data', rank=1)
    assert (fault.rank, fault.epoch, fault.step, fault.kind, fault.active) == (1, 2, 3, 'data', True)
    assert not FaultInjection('1:2:3:data', rank=0).active  # another process
    with pytest.raises(ValueError, match=r"RANK:EPOCH:STEP:kill\|data\|forward, got '1:2:data'"):
        FaultInjection('1:2:data', rank=1)


@pytest.mark.parametrize('restarts,active', [('', True), ('0', True), ('1', False)])
def test_faults_strike_on_the_first_attempt_only(monkeypatch, restarts, active):
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', restarts)
    assert FaultInjection('0:0:0:data', rank=0).active is active


def test_the_loader_fails_at_the_chosen_step_of_the_chosen_epoch(monkeypatch):
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT', raising=False)
    loader = _loader()
    fault = FaultInjection('0:1:2:data', rank=0)
    assert fault.wrap(loader, 0, 0) is loader  # another epoch: untouched
    wrapped = fault.wrap(loader, 1, 0)
    assert len(wrapped) == 4 and wrapped.dataset is loader.dataset
    it = iter(wrapped)
    assert [int(next(it)[1][0]) for _ in range(2)] == [0, 2]  # steps 0 and 1 as they are
    with pytest.raises(DatasetError, match='injected by --debug-fault'):
        next(it)
    resumed = iter(fault.wrap(loader, 1, 1))  # resumed after step 1: the loader's step 1 is the epoch's step 2
    next(resumed)
    with pytest.raises(DatasetError):
        next(resumed)


def test_a_forward_fault_hands_over_a_batch_one_pixel_too_small(monkeypatch):
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT', raising=False)
    batches = list(FaultInjection('0:0:1:forward', rank=0).wrap(_loader(), 0, 0))
    assert [tuple(images.shape) for images, _ in batches] == [(2, 3, 4, 4), (2, 3, 3, 3), (2, 3, 4, 4), (2, 3, 4, 4)]
    assert torch.equal(batches[1][1], torch.tensor([2, 3]))  # the labels as they are
