"""``python -m cli`` runs the trainer command line."""
from cli.main import entry

entry()
