"""The in-guest agent for real Linux guests, as one self-contained installer.

Run inside the guest as root: it installs the portable shell agent and its
systemd unit (or says how to start it where there is no systemd). The guest
needs a virtio-serial port named org.vmstream.agent, which every vmstream VM
has.
"""

from __future__ import annotations

from importlib import resources


def _file(name: str) -> str:
    return (resources.files("vmstream.guest") / "files" / name).read_text()


def agent_installer() -> str:
    return f"""#!/bin/sh
# vmstream in-guest agent installer: run as root inside the guest.
set -e
install -d /usr/local/sbin /etc/vmstream/clone.d
cat > /usr/local/sbin/vmstream-agent <<'VMSTREAM_AGENT_EOF'
{_file("vmstream-agent.sh")}VMSTREAM_AGENT_EOF
chmod 755 /usr/local/sbin/vmstream-agent
if command -v systemctl >/dev/null 2>&1; then
  cat > /etc/systemd/system/vmstream-agent.service <<'VMSTREAM_UNIT_EOF'
{_file("vmstream-agent.service")}VMSTREAM_UNIT_EOF
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now vmstream-agent.service
    echo "vmstream-agent installed and started (systemd)"
  else  # an image being built (chroot): it starts at the next boot
    systemctl enable vmstream-agent.service
    echo "vmstream-agent installed and enabled for the next boot (systemd is not running here)"
  fi
else
  echo "vmstream-agent installed; no systemd here: start '/bin/sh /usr/local/sbin/vmstream-agent &' at boot"
fi
echo "clone hooks go in /etc/vmstream/clone.d/ (executable files, run in name order)"
"""
