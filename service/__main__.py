import os
import sys

from models.hardware import choose_openmp_wait

# Before torch loads its OpenMP runtime: passive waits on a busy machine, no spinning against other jobs.
os.environ["MMF_OPENMP_WAIT"] = choose_openmp_wait()

from service import cli

try:
    code = cli.main()
except SystemExit as exc:  # SIGTERM's clean stop (service/cli.py), or a message
    if exc.code is None or isinstance(exc.code, int):
        code = exc.code or 0
    else:
        print(exc.code, file=sys.stderr)
        code = 1
if cli.server_ran:
    # The server has shut down (uvicorn, the embedded Redis). The interpreter's own teardown, collecting torch's
    # and FAISS's objects, took seconds, long enough for a container's stop to end in SIGKILL: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
