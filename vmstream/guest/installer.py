"""The in-guest agent for real Linux guests, as one self-contained installer.

Run inside the guest as root. On x86_64 it installs the native agent (the same
static C binary the demo guest runs: a clone's identity is a few system calls,
against ~3 s for the shell version under TCG) and, beside it, the portable shell
agent, which runs the clone hooks and is the agent on any other architecture;
then its systemd unit (or says how to start it where there is no systemd). The
guest needs a virtio-serial port named org.vmstream.agent, which every vmstream
VM has.

It also puts in the shipped clone hooks (SHIPPED_HOOKS, files/hooks/): what a
systemd guest's clones would otherwise share, a machine id and SSH host keys,
is made anew in each clone. A hook turned off with chmod -x stays off when the
installer runs again.
"""

from __future__ import annotations

import base64
import tempfile
import textwrap
from functools import cache
from importlib import resources
from pathlib import Path

from vmstream.guest.build import compile_static

SHELL_AGENT = "/usr/local/sbin/vmstream-agent"
HOOKS_DIR = "/etc/vmstream/clone.d"
SHIPPED_HOOKS = ("10-machine-id", "20-ssh-host-keys")
NATIVE_AGENT = "/usr/local/lib/vmstream/vmstream-agent"


def _file(name: str) -> str:
    return (resources.files("vmstream.guest") / "files" / name).read_text()


@cache
def native_agent() -> bytes:
    """The static native agent (x86_64), compiled here with the host's gcc."""
    source = (resources.files("vmstream.guest") / "files" / "vmstream-agent.c").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        return compile_static("vmstream-agent", source, Path(tmp), flags=("-s",))  # stripped: the script carries it


def shipped_hook(name: str) -> str:
    return _file(f"hooks/{name}")


def hooks_part(hooks_dir: str = HOOKS_DIR) -> str:
    """Shell that writes the shipped hooks: executable, unless the user made one not."""
    parts = ["""install_hook() {  # install_hook NAME < text: a hook turned off (chmod -x) stays off
  f=""" + hooks_dir + """/$1
  mode=755; [ -e "$f" ] && [ ! -x "$f" ] && mode=644
  cat > "$f.tmp" && chmod "$mode" "$f.tmp" && mv "$f.tmp" "$f"
}
"""]
    for name in SHIPPED_HOOKS:
        parts.append(f"install_hook {name} <<'VMSTREAM_HOOK_EOF'\n{shipped_hook(name)}VMSTREAM_HOOK_EOF\n")
    return "".join(parts)


def _unit(exec_start: str) -> str:
    unit = _file("vmstream-agent.service").replace("ExecStart=/bin/sh /usr/local/sbin/vmstream-agent", exec_start)
    assert exec_start in unit, "the unit file's ExecStart line changed: update the installer"
    return unit


def agent_installer(native: bool = True) -> str:
    """The installer script; native=False installs only the shell agent."""
    native_part = ""
    if native:
        b64 = "\n".join(textwrap.wrap(base64.b64encode(native_agent()).decode(), 76))
        native_part = f"""if [ "$(uname -m)" = x86_64 ] && command -v base64 >/dev/null 2>&1; then
  install -d {Path(NATIVE_AGENT).parent}
  base64 -d > {NATIVE_AGENT}.tmp <<'VMSTREAM_NATIVE_EOF'
{b64}
VMSTREAM_NATIVE_EOF
  chmod 755 {NATIVE_AGENT}.tmp && mv {NATIVE_AGENT}.tmp {NATIVE_AGENT}
  kind=native
fi
"""
    native_unit = _unit(f"ExecStart={NATIVE_AGENT}")
    return f"""#!/bin/sh
# vmstream in-guest agent installer: run as root inside the guest.
set -e
install -d /usr/local/sbin {HOOKS_DIR}
cat > {SHELL_AGENT} <<'VMSTREAM_AGENT_EOF'
{_file("vmstream-agent.sh")}VMSTREAM_AGENT_EOF
chmod 755 {SHELL_AGENT}
{hooks_part()}kind=portable
{native_part}if command -v systemctl >/dev/null 2>&1; then
  if [ "$kind" = native ]; then
    cat > /etc/systemd/system/vmstream-agent.service <<'VMSTREAM_UNIT_EOF'
{native_unit}VMSTREAM_UNIT_EOF
  else
    cat > /etc/systemd/system/vmstream-agent.service <<'VMSTREAM_UNIT_EOF'
{_file("vmstream-agent.service")}VMSTREAM_UNIT_EOF
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable vmstream-agent.service
    systemctl restart vmstream-agent.service
    echo "vmstream-agent ($kind) installed and started (systemd)"
  else  # an image being built (chroot): it starts at the next boot
    systemctl enable vmstream-agent.service
    echo "vmstream-agent ($kind) installed and enabled for the next boot (systemd is not running here)"
  fi
elif [ "$kind" = native ]; then
  echo "vmstream-agent installed; no systemd here: start '{NATIVE_AGENT} &' at boot"
else
  echo "vmstream-agent installed; no systemd here: start '/bin/sh {SHELL_AGENT} &' at boot"
fi
echo "clone hooks go in {HOOKS_DIR}/ (executable files, run in name order); shipped:" \
  "{", ".join(SHIPPED_HOOKS)} (turn one off with chmod -x)"
"""
