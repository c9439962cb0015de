"""`python -m exporter.simulator`: see exporter/simulator/cli.py."""

from exporter.simulator.cli import main

raise SystemExit(main())
