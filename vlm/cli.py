"""The `vlm` command line (placeholder; grown by later commits)."""
import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlm")
    parser.parse_args(argv)
    return 0
