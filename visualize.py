"""visualize.py: visualization (issue 6). Not implemented yet."""
import sys


def main() -> int:
    print('visualize.py: not yet — visualization (issue 6) has not landed. The models are in models/.', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
