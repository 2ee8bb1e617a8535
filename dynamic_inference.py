"""dynamic_inference.py: the four evaluation modes (issue 3). Not implemented yet."""
import sys


def main() -> int:
    print('dynamic_inference.py: not yet — the four evaluation modes (issue 3) has not landed. The models are in models/.', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
