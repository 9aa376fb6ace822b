"""Multi-host start-up, agreement checks, and a launcher for local processes."""

from ._launch import LaunchError as LaunchError
from ._launch import LaunchResult as LaunchResult
from ._launch import ProcessResult as ProcessResult
from ._launch import launch_local as launch_local
from ._multihost import ProcessMismatchError as ProcessMismatchError
from ._multihost import check_processes_agree as check_processes_agree
from ._multihost import initialize_multihost as initialize_multihost
