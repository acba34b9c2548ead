from cluster.cli import main
from jobs.core.processes import exit_with

exit_with(main)
