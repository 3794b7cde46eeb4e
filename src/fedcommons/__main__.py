"""``python -m fedcommons`` runs the CLI."""

from fedcommons.cli import main

main()
