"""main_deit.py: training CF-DeiT (issue 4). Not implemented yet."""
import sys


def main() -> int:
    print('main_deit.py: not yet — training CF-DeiT (issue 4) has not landed. The models are in models/.', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
