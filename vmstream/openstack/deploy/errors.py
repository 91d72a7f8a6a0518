"""What can go wrong standing up the deployment; each keeps the exit code and HTTP status of
a class in vmstream.errors and names the fix.

    VmstreamError
     +- DeployError          a step failed (a command, the install)          exit 1
     |   +- ServiceFailed    a service exited or did not answer in time      exit 1
     +- InvalidInput
     |   +- NotRoot          installs and runs services as root only          exit 2
     +- Conflict
         +- PortInUse        another process listens on a port we need       exit 4
"""

from __future__ import annotations

from vmstream.errors import Conflict, InvalidInput, VmstreamError


class DeployError(VmstreamError):
    """A deployment step failed; the message names the step and where its output is."""


class ServiceFailed(DeployError):
    """A service exited or did not answer; the message carries the end of its log."""


class NotRoot(InvalidInput):
    pass


class PortInUse(Conflict):
    pass
