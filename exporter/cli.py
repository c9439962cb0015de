"""Command line entry point (being built)."""


def main() -> int:
    return 0
