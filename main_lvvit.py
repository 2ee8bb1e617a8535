"""main_lvvit.py: training CF-LV-ViT with token labeling (issue 5). Not implemented yet."""
import sys


def main() -> int:
    print('main_lvvit.py: not yet — training CF-LV-ViT with token labeling (issue 5) has not landed. The models are in models/.', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
