"""datasets/safe_read.py directly: the one open of a file from outside (never blocking on a pipe, links refused
when asked), capped and nested-bounded JSON, a small schema, and the shape check of loaded states.

Fast (no model, no subprocess): each function with a value it accepts and the one-line refusals it gives.
"""
from __future__ import annotations

import argparse
import json
import os
import threading

import pytest

from datasets.safe_read import (
    MAX_DEPTH, UnsafeFileError, bounded_depth, check_like, link_above_root, open_regular, read_capped,
    read_structured, short_repr,
)


def _json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


# ---------------------------------------------------------------------------------------------- open_regular
def test_open_regular_reads_a_file_and_follows_a_link_by_default(tmp_path):
    target = tmp_path / 'a.txt'
    target.write_text('abc')
    (tmp_path / 'link').symlink_to(target)
    for path in (target, tmp_path / 'link'):
        fd = open_regular(path)
        try:
            assert os.read(fd, 10) == b'abc'
        finally:
            os.close(fd)


def test_open_regular_refuses_a_link_when_asked(tmp_path):
    target = tmp_path / 'a.txt'
    target.write_text('abc')
    (tmp_path / 'link').symlink_to(target)
    with pytest.raises(UnsafeFileError, match=r'lock .*link is a symbolic link: refused'):
        open_regular(tmp_path / 'link', what='lock', follow=False)


def test_open_regular_never_waits_on_a_named_pipe(tmp_path):
    fifo = tmp_path / 'log.txt'
    os.mkfifo(fifo)
    done = []

    def attempt() -> None:
        for follow in (True, False):
            with pytest.raises(UnsafeFileError, match='is a named pipe: refused'):
                open_regular(fifo, os.O_RDONLY, what='log', follow=follow)
        done.append(True)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert done == [True], 'open_regular blocked on a FIFO'


def test_open_regular_refuses_a_folder_and_truncation(tmp_path):
    with pytest.raises(UnsafeFileError, match='is a folder: refused'):
        open_regular(tmp_path, follow=False)
    with pytest.raises(ValueError, match='O_TRUNC'):
        open_regular(tmp_path / 'x', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)


def test_open_regular_passes_a_missing_file_on_as_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / 'missing')


# ---------------------------------------------------------------------------------------------- reading
def test_read_capped_holds_its_cap(tmp_path):
    path = tmp_path / 'f.bin'
    path.write_bytes(b'x' * 100)
    assert read_capped(path, 100, 'data') == b'x' * 100
    with pytest.raises(UnsafeFileError, match=r'data .*f\.bin is larger than 99 bytes: refused'):
        read_capped(path, 99, 'data')


def test_read_structured_returns_the_object_and_checks_the_schema(tmp_path):
    path = _json(tmp_path / 'm.json', {'n': 3, 'names': ['a', 'b'], 'extra': None})
    assert read_structured(path, schema={'n': int, 'names': [str]}) == {'n': 3, 'names': ['a', 'b'], 'extra': None}
    with pytest.raises(UnsafeFileError, match='manifest'):
        read_structured(path, what='manifest', schema={'names': [int]})
    with pytest.raises(UnsafeFileError, match='manifest'):
        read_structured(path, what='manifest', schema={'missing': int})


@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe', 'is not UTF-8 text'),
    (b'{"a": ', 'is not valid JSON'),
    (b'[' * (MAX_DEPTH + 1) + b']' * (MAX_DEPTH + 1), f'nested deeper than {MAX_DEPTH} levels'),
])
def test_read_structured_refuses_in_one_line(tmp_path, content, message):
    path = tmp_path / 'bad.json'
    path.write_bytes(content)
    with pytest.raises(UnsafeFileError, match=message) as info:
        read_structured(path, what='class index')
    assert '\n' not in str(info.value) and str(info.value).startswith('class index ')


def test_read_structured_refuses_a_device_and_a_link_when_asked(tmp_path):
    with pytest.raises(UnsafeFileError, match='character device'):
        read_structured('/dev/zero')
    (tmp_path / 'link.json').symlink_to(_json(tmp_path / 'real.json', {}))
    assert read_structured(tmp_path / 'link.json') == {}
    with pytest.raises(UnsafeFileError, match='symbolic link'):
        read_structured(tmp_path / 'link.json', follow=False)


# ---------------------------------------------------------------------------------------------- structures
def test_bounded_depth_counts_without_recursion():
    assert bounded_depth({'a': [1, (2, {3})]}) == 4
    assert bounded_depth(argparse.Namespace(x=[[1]])) == 3
    deep: list = []
    for _ in range(200_000):  # far beyond Python's recursion limit
        deep = [deep]
    with pytest.raises(UnsafeFileError, match='the data is nested deeper than 32 levels'):
        bounded_depth(deep)
    with pytest.raises(KeyError):
        bounded_depth(deep, where='x', error=KeyError)


def test_bounded_depth_ends_a_structure_that_contains_itself():
    loop: list = []
    loop.append(loop)
    with pytest.raises(UnsafeFileError):
        bounded_depth(loop)


def test_check_like_accepts_the_shape_and_names_the_first_difference():
    reference = {'last_epoch': 3, 'base_lrs': [0.1, 0.2], 'metric': None, 'mode': 'max', 'nested': {'ok': True}}
    check_like({'last_epoch': 7, 'base_lrs': [1.0, 2], 'metric': 0.5, 'mode': 'min', 'nested': {'ok': False}},
               reference, 'scheduler')
    cases = [
        ({'last_epoch': '3'}, "scheduler: last_epoch is '3', expected 3-like (int)"),
        ({'last_epoch': True}, 'scheduler: last_epoch is True'),
        ({'base_lrs': [0.1]}, 'scheduler: base_lrs is [0.1], expected a list of 2 values'),
        ({'surprise': 1}, 'scheduler: it has entries this run does not know: surprise'),
        ({'nested': {'ok': 1}}, 'scheduler: nested.ok is 1'),
        ([], 'scheduler: it is [], expected an object'),
    ]
    for value, message in cases:
        with pytest.raises(UnsafeFileError) as info:
            check_like(value, reference, 'scheduler')
        assert str(info.value).startswith(message), str(info.value)


def test_short_repr_cuts_and_never_raises():
    assert short_repr('x' * 100, limit=10) == repr('x' * 100)[:10] + '...'

    class Bad:
        def __repr__(self) -> str:
            raise ValueError

    assert short_repr(Bad()) == 'a Bad'


def test_link_above_root_sees_a_link_to_an_enclosing_folder(tmp_path):
    root = tmp_path / 'data'
    (root / 'train').mkdir(parents=True)
    (root / 'train' / 'up').symlink_to(root)
    (root / 'train' / 'side').symlink_to(tmp_path)
    other = tmp_path / 'elsewhere'
    other.mkdir()
    (root / 'train' / 'out').symlink_to(other)
    assert link_above_root(str(root / 'train' / 'up'), [str(root)])
    assert link_above_root(str(root / 'train' / 'side'), [str(root)])
    assert not link_above_root(str(root / 'train' / 'out'), [str(root)])
