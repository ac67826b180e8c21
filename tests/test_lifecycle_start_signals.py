"""A signal while `tokenwire` is still starting (loading its verbs, the engine or the edge's
libraries) ends it at once and quietly, with the status the verb has for that signal."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


pytestmark = pytest.mark.usefixtures("interruptible")


def _signalled_while_importing(sig: signal.Signals, module: str, *argv: str) -> tuple[int, str]:
    """`tokenwire ARGV`, sent `sig` as soon as it has imported `module` (Python's -X importtime
    lines on stderr say when), while it goes on loading what follows; its status and stderr."""
    command = [sys.executable, "-X", "importtime", "-m", "tokenwire.client.command", *argv]
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        read = []
        for line in proc.stderr:
            read.append(line)
            if line.rsplit("|", 1)[-1].strip() == module:
                proc.send_signal(sig)
                break
        try:
            _, rest = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert read[-1].rsplit("|", 1)[-1].strip() == module, f"{module} was never imported"
    return proc.returncode, "".join(read) + rest


# Each case's module is imported early enough that much is left to load once it is: numpy
# before ONNX Runtime (serve), structlog before the edge's server (edge), asyncio before gRPC
# (every verb's parser). Settings a verb refuses make one that outran its signal exit 2.
@pytest.mark.parametrize(
    ("sig", "module", "argv"),
    [
        (signal.SIGINT, "numpy", ("serve", "--port", "0", "--metrics-port", "0")),
        (signal.SIGTERM, "numpy", ("serve", "--port", "0", "--metrics-port", "0")),
        (signal.SIGINT, "structlog", ("edge", "--port", "70000")),
        (signal.SIGINT, "asyncio", ("up", "--grpc-port", "0")),
    ],
    ids=["serve-sigint", "serve-sigterm", "edge", "up"],
)
def test_a_signal_while_a_service_starts_exits_0_at_once(
    sig: signal.Signals, module: str, argv: tuple[str, ...]
) -> None:
    """SIGINT (or SIGTERM) to `serve`, `edge` or `up` while it still loads its libraries ends
    it with status 0, as the same signal would once it is ready, and no traceback."""
    code, err = _signalled_while_importing(sig, module, *argv)
    assert "Traceback" not in err
    assert code == 0


def test_ctrl_c_while_generate_starts_exits_130() -> None:
    """Ctrl-C to `generate` while it loads gRPC ends it with status 130, as Ctrl-C during its
    stream does, and no traceback."""
    code, err = _signalled_while_importing(
        signal.SIGINT, "asyncio", "generate", "x", "--target", "127.0.0.1:9", "--timeout", "5"
    )
    assert "Traceback" not in err
    assert code == 130
