"""Entry point: `python -m evaluation` (see evaluation/cli.py for the options)."""

from evaluation.cli import main

raise SystemExit(main())
