# Waits, in the sandbox, for a run: a line with the code's length in bytes, the
# code, then the program's own stdin. Runs the code as `python main.py` would:
# its tracebacks, its exit status; exits without the slow teardown. (Comments,
# not a docstring: the code runs in this module's globals, whose __doc__ it sees.)
import os, sys
def _end(status):  # what exiting does that a program can see, without the slow teardown
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    __import__("atexit")._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(status)
def _show(e, tb):  # the traceback a plain `python main.py` prints
    sys.excepthook(type(e), e, e.with_traceback(tb).__traceback__)
    _end(1)
def _boot():
    head = b""
    while not head.endswith(b"\n"):
        head += os.read(0, 1) or sys.exit(0)
    size, src = int(head), b""
    while len(src) < size:
        src += os.read(0, size - len(src)) or sys.exit(0)
    with open("main.py", "wb") as f:
        f.write(src)
    try:
        return compile(src, "main.py", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte
        _show(e, None)
code = _boot()
del _boot
sys.argv, __file__ = ["main.py"], "main.py"
try:
    exec(code)
except SystemExit as e:
    if not isinstance(e.code, int | None):
        print(e.code, file=sys.stderr)
    _end(e.code if isinstance(e.code, int) else int(e.code is not None))
except BaseException as e:
    _show(e, e.__traceback__.tb_next)
_end(0)
