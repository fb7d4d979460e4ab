"""scripts/install_browser.sh (run by scripts/setup.sh test) installs chromium and chromium-driver
with apt-get only when they are missing and it runs as root, reads the package lists only when
installing without them fails (a fresh image has none), never asks, and never fails the set-up.
Checked with a fake apt-get and id on a PATH of their own."""

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL = "-q -y -o Dpkg::Use-Pty=0 install --no-install-recommends chromium chromium-driver"
UPDATE = "-q -y -o Dpkg::Use-Pty=0 update"

# Logs each call; `install` fails until `update` has made the lists, then puts the two programs on
# PATH. HANG=1: every call hangs.
FAKE_APT_GET = """#!{sh}
echo "$DEBIAN_FRONTEND $*" >> "$LOG"
[ -z "$HANG" ] || exec sleep 100
case "$*" in
  *" update") : > "$LISTS" ;;
  *" install "*) [ -e "$LISTS" ] || exit 100
    for program in chromium chromedriver; do echo '#!{sh}' > "$BIN/$program"; chmod +x "$BIN/$program"; done ;;
esac
"""


def run(tmp_path: Path, uid: int = 0, lists: bool = False, have: tuple = (), **env: str):
    """Runs the script on a PATH holding a fake `id` (printing `uid`), the fake apt-get, and the
    programs in `have`; returns (the apt-get calls, the process)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sh = shutil.which("sh")
    for tool in ("timeout", "chmod", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, text in {"id": f"#!{sh}\necho {uid}\n", "apt-get": FAKE_APT_GET.format(sh=sh),
                       **{program: f"#!{sh}\n" for program in have}}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, lists_file = tmp_path / "apt.log", tmp_path / "lists"
    if lists:
        lists_file.touch()
    proc = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "install_browser.sh")],
                          env={"PATH": str(bin_dir), "LOG": str(log), "LISTS": str(lists_file), "BIN": str(bin_dir),
                               **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return (log.read_text().splitlines() if log.exists() else []), proc


def test_a_fresh_machine_reads_the_lists_then_installs(tmp_path):
    calls, proc = run(tmp_path)
    assert calls == [f"noninteractive {INSTALL}", f"noninteractive {UPDATE}", f"noninteractive {INSTALL}"]
    assert (tmp_path / "bin" / "chromedriver").exists()
    assert "installed chromium chromium-driver" in proc.stdout


def test_with_package_lists_it_installs_at_once(tmp_path):
    calls, _ = run(tmp_path, lists=True)
    assert calls == [f"noninteractive {INSTALL}"]


def test_nothing_is_installed_when_both_are_there(tmp_path):
    assert run(tmp_path, have=("chromium", "chromedriver"))[0] == []


def test_one_missing_is_installed(tmp_path):
    assert run(tmp_path, lists=True, have=("chromium",))[0] == [f"noninteractive {INSTALL}"]


def test_without_root_it_says_the_browser_test_will_skip(tmp_path):
    calls, proc = run(tmp_path, uid=1000)
    assert calls == []
    assert "needs root and apt-get" in proc.stderr and "skip" in proc.stderr


def test_a_hung_apt_get_is_ended_and_does_not_fail_the_set_up(tmp_path):
    calls, proc = run(tmp_path, APT_TIMEOUT="1", HANG="1")  # each call would hang 100 s; run() waits 60 at most
    assert calls == [f"noninteractive {INSTALL}", f"noninteractive {UPDATE}"]
    assert "could not install" in proc.stderr


def test_it_can_be_turned_off(tmp_path):
    assert run(tmp_path, LLAMA_NO_BROWSER="1")[0] == []
