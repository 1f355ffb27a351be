"""The command-line interface: parsing and printing only; the work is in the
Python API (:mod:`snapshotter.api`), which also takes the locks and writes the
audit records, so a command and a Python caller share one behaviour.

One module per group of commands; they register on :data:`cli` when imported
at the bottom of this file.  :func:`main` is the only place that turns errors
into exit codes.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import click

from .. import __version__
from ..config import Config, load_config
from ..errors import AuditNotWritten, Interrupted, SnapshotterError, UsageError, from_exception

CONTEXT_SETTINGS = {"auto_envvar_prefix": "SNAPSHOTTER", "help_option_names": ["-h", "--help"],
                    "max_content_width": 100}


@dataclass
class App:
    """Global options and the lazily loaded configuration and opened repository."""

    config_path: str | None = None
    repo_url: str | None = None
    json: bool = False
    verbose: int = 0
    quiet: int = 0
    progress: bool = True
    lock_wait: float = 0.0
    metrics_file: str | None = None
    command: str = ""
    results: dict = field(default_factory=dict)
    #: an audit record that could not be appended (main() reports it when the command ends)
    audit_failure: SnapshotterError | None = None
    started: float = field(default_factory=time.time)

    @cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @cached_property
    def api(self):
        """The repository, opened through the Python API, which takes the locks and
        writes the audit records."""
        from ..api import Repository
        return Repository.open(self.config, url=self.repo_url, **self.api_options())

    def api_options(self) -> dict:
        """The global options, as the API takes them."""
        lock_message = lambda text: click.echo(f"snapshotter: {text}", err=True)  # noqa: E731
        return {"lock_wait": self.lock_wait, "warn": self.warn, "on_lock_lost": lock_message,
                "on_lock_wait": (lambda text: None) if self.quiet else lock_message}

    def call(self, method: Callable, *args, **kwargs):
        """An API call that changes something: when only its audit record could not be
        appended, its result all the same (printed as usual; main() then reports the
        audit failure and exits with its code)."""
        try:
            return method(*args, **kwargs)
        except AuditNotWritten as exc:
            self.audit_failure = exc
            return exc.result

    def finish(self, code: int) -> int:
        """After the command: what kept its audit record from being written, and the
        metrics file; returns the exit code."""
        try:
            if self.audit_failure is not None:
                self._late_error(self.audit_failure.message, code)
                code = code or self.audit_failure.exit_code
            if self.metrics_file:
                from ..metrics import run_from_results, write_metrics
                try:
                    write_metrics(self.metrics_file, run_from_results(self.command, code, self.started, self.results))
                except Exception as exc:
                    self._late_error(f"cannot write metrics file {self.metrics_file}: {exc}", code)
                    code = code or 1
        except KeyboardInterrupt:
            code = code or 130
        return code

    def _late_error(self, text: str, code: int) -> None:
        """A failure after the command ended; when it turns success into exit 1, scripts
        reading --json get it in the error shape."""
        if self.json and code == 0:
            click.echo(_error_json(SnapshotterError(text)), err=True)
        else:
            click.echo(f"snapshotter: {one_line(text)}", err=True)

    # -- output --------------------------------------------------------------

    def out(self, data: Any, human: Callable[[], None] | None = None) -> None:
        """The command's result: one JSON document with --json, else human text."""
        if self.json:
            text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
            from ..codec import is_text
            if not is_text(text):  # text holding bytes that are not UTF-8: as \udcXX escapes
                text = json.dumps(data, indent=2, ensure_ascii=True, default=str)
            click.echo(text)
        elif human is not None:
            human()

    def info(self, text: str) -> None:
        if not self.quiet and not self.json:
            click.echo(text)

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the command: stderr, always."""
        click.echo(f"snapshotter: {one_line(text)}", err=True)

    def log(self, text: str) -> None:
        """Diagnostics: stderr, shown with -v."""
        if self.verbose:
            click.echo(text, err=True)

    def progress_bar(self, description: str, total: int | None = None):
        from ..progress import Progress
        enabled = self.progress and not self.quiet and sys.stderr.isatty()
        return Progress(description, total=total, enabled=enabled)


pass_app = click.make_pass_decorator(App)


def checked(check: Callable[[], dict]) -> tuple[dict, SnapshotterError | None]:
    """A check's report (verify, audit verify) and the error saying it found problems,
    for the caller to raise once the report is printed."""
    from ..errors import IntegrityError
    try:
        return check(), None
    except IntegrityError as exc:
        if getattr(exc, "report", None) is None:
            raise
        return exc.report, exc


def ask(question: str) -> bool:
    """A yes/no question on the terminal (stderr); Ctrl-C or the end of input interrupts."""
    try:
        return click.confirm(question, default=False, err=True)
    except click.exceptions.Abort:
        raise Interrupted("interrupted") from None


#: the module that defines each command; it is imported only when its command runs (or
#: for help), so a command pays for its own imports and no other's
COMMAND_MODULES = {
    "audit": "maintenance_cmd", "forget": "maintenance_cmd", "prune": "maintenance_cmd", "unlock": "maintenance_cmd",
    "backends": "repo_cmds", "init": "repo_cmds", "list": "repo_cmds", "mark-good": "repo_cmds",
    "unmark-good": "repo_cmds", "show": "repo_cmds", "verify": "repo_cmds",
    "demo": "demo_cmd", "diff": "restore_cmd", "restore": "restore_cmd", "quarantine": "quarantine_cmd",
    "snapshot": "snapshot_cmd",
}


class LazyGroup(click.Group):
    """The top-level group: commands register themselves when their module is imported."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, name: str):
        if name not in self.commands and name in COMMAND_MODULES:
            import importlib
            importlib.import_module(f"{__name__}.{COMMAND_MODULES[name]}")
        cmd = self.commands.get(name)
        if cmd is not None:
            flag_envvars(cmd, f"SNAPSHOTTER_{name}")
        return cmd


def flag_envvars(cmd: click.Command, prefix: str) -> None:
    """``SNAPSHOTTER_<COMMAND>_<FLAG>`` for every option, named after its long flag.

    Click's automatic name comes from the option's Python parameter, which differs from
    the flag where the code renames it (``--hash`` is ``hash_name``, ``--source`` of
    ``snapshot`` is ``sources``); the README promises the flag's name."""
    prefix = prefix.upper().replace("-", "_")
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.envvar is not None or not param.allow_from_autoenv:
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        if longs:
            param.envvar = f"{prefix}_{max(longs, key=len)[2:].upper().replace('-', '_')}"
            # and not click's name from the parameter as well (SNAPSHOTTER_INIT_HASH_NAME; two
            # flags of one parameter, --stale/--all of unlock, would share SNAPSHOTTER_UNLOCK_MODE)
            param.allow_from_autoenv = False
    for sub_name, sub in getattr(cmd, "commands", {}).items():
        flag_envvars(sub, f"{prefix}_{sub_name}")


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="snapshotter", allow_from_autoenv=False)  # not SNAPSHOTTER_VERSION
@click.option("--config", "config_path", metavar="PATH", envvar="SNAPSHOTTER_CONFIG", type=click.Path(dir_okay=False),
              help="Config file (default: $SNAPSHOTTER_CONFIG, else ./snapshotter.toml).")
@click.option("--repo", "repo_url", metavar="URL", envvar="SNAPSHOTTER_REPO", help="Repository URL; overrides [repository] url.")
@click.option("--json", "as_json", is_flag=True, envvar="SNAPSHOTTER_JSON", help="Print one JSON document on stdout.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr; tracebacks for unexpected errors.")
@click.option("-q", "--quiet", count=True, help="Print less.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--lock-wait", type=click.FloatRange(min=0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS for a lock instead of failing at once (exit 4).")
@click.option("--metrics-file", metavar="PATH", help="Write Prometheus textfile metrics for this run.")
@click.pass_context
def cli(ctx: click.Context, config_path, repo_url, as_json, verbose, quiet, no_progress, lock_wait, metrics_file):
    """snapshotter: snapshot, restore and quarantine the state of AI agents."""
    # main() passes the App in, so it can write the audit record and metrics after the command
    app = ctx.ensure_object(App)
    app.config_path, app.repo_url, app.json, app.verbose, app.quiet = config_path, repo_url, as_json, verbose, quiet
    if metrics_file:
        folder = os.path.dirname(os.path.abspath(metrics_file))
        if not os.path.isdir(folder) or os.path.isdir(metrics_file):
            # found out only after the command's work otherwise (a snapshot committed, then exit 1)
            raise UsageError(f"--metrics-file {metrics_file}: "
                             f"{'is a folder' if os.path.isdir(metrics_file) else 'its folder does not exist'}")
    app.progress, app.lock_wait, app.metrics_file = not no_progress, lock_wait, metrics_file
    app.command = ctx.invoked_subcommand or ""


def one_line(text: str) -> str:
    """A message as printed: one line (control characters escaped, since a message may
    quote names and values read from the repository) and no secret."""
    from ..names import printable
    from ..redaction import redact_text
    return printable(redact_text(text), limit=4000)


def _error_json(exc: SnapshotterError) -> str:
    details = getattr(exc, "details", None) or {}
    return json.dumps({"error": {"type": exc.kind, "message": one_line(exc.message), "exit_code": exc.exit_code,
                                 **details}}, ensure_ascii=False, default=str)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _option_arity(params) -> dict[str, bool]:
    """Each option name of these parameters -> whether it takes a value."""
    out = {}
    for p in params:
        if isinstance(p, click.Option):
            for name in (*p.opts, *p.secondary_opts):
                out[name] = not (p.is_flag or p.count)
    return out


def global_options_first(args: list[str]) -> list[str]:
    """The arguments with the group's options moved before the subcommand, so that they are
    accepted anywhere (``snapshotter list --json``).  An option the subcommand itself has (or
    a value of one of its options) stays where it is; so does everything after ``--``."""
    glob = _option_arity(cli.params)
    ctx = click.Context(cli, info_name="snapshotter")
    front: list[str] = []
    rest: list[str] = []
    own: dict[str, bool] = {}
    group: click.Command | None = cli
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        name = a.split("=", 1)[0] if a.startswith("--") else a
        short_count = len(a) > 2 and a[0] == "-" and a[1] != "-" and set(a[1:]) <= {"v"} | {"q"} and len(set(a[1:])) == 1
        if name in own or (not a.startswith("-") and group is None):
            rest.append(a)
            if name in own and own[name] and "=" not in a and i + 1 < len(args):
                rest.append(args[i + 1])  # the subcommand option's value, whatever it looks like
                i += 1
        elif name in glob or short_count:
            takes = glob.get(name, False) and "=" not in a
            front.append(a)
            if takes and i + 1 < len(args):
                front.append(args[i + 1])
                i += 1
        elif not a.startswith("-") and isinstance(group, click.Group):
            sub = group.get_command(ctx, a)
            rest.append(a)
            if sub is None:
                group = None
            else:
                own.update(_option_arity(sub.params))
                group = sub if isinstance(sub, click.Group) else None
        else:
            rest.append(a)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the README's table)."""
    args = sys.argv[1:] if argv is None else argv
    args = global_options_first(list(args))
    as_json = "--json" in args or os.environ.get("SNAPSHOTTER_JSON", "").lower() in ("1", "true", "yes")
    verbose = any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    app = App()
    try:
        try:
            cli.main(args=args, prog_name="snapshotter", standalone_mode=False, obj=app)
        except BaseException as exc:
            # a failed change whose audit record could not be appended either: reported last
            app.audit_failure = getattr(exc, "audit_failure", None) or app.audit_failure
            raise
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        code = report(Interrupted("interrupted"), as_json)
    except click.ClickException as exc:
        if as_json:
            click.echo(json.dumps({"error": {"type": "usage", "message": exc.format_message(), "exit_code": 2}}, ensure_ascii=False), err=True)
        else:
            # one line, like every other error, so cron logs and greps see it whole
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            click.echo(f"snapshotter: {' '.join(exc.format_message().split())}{hint}", err=True)
        code = exc.exit_code if exc.exit_code else 2
    except KeyboardInterrupt as exc:
        code = report(from_exception(exc), as_json)
    except SnapshotterError as exc:
        if verbose:
            traceback.print_exc()
        code = report(exc, as_json)
    except Exception as exc:  # a bug, or a library error not translated at its boundary
        if verbose:
            traceback.print_exc()
        code = report(SnapshotterError(f"{from_exception(exc).message} (run with -v for the traceback)"), as_json)
    else:
        code = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    return app.finish(code)


def report(exc: SnapshotterError, as_json: bool) -> int:
    if as_json:
        click.echo(_error_json(exc), err=True)
    else:
        click.echo(f"snapshotter: {one_line(exc.message)}", err=True)
    return exc.exit_code


#: cyclic garbage collection for the console program: a collection of the young
#: generation every 100,000 container allocations instead of 700.  A snapshot makes
#: a few container objects per row (libpq's tuples, batches), none of them cyclic,
#: so the default ran ~700 needless collections per 500,000 rows and several full
#: ones over the ~300,000 objects the imports leave (measured: 0.07 s of a 2.0 s
#: snapshot).  Cycles are still collected; garbage waits at most one threshold.
GC_THRESHOLDS = (100_000, 50, 100)


def run() -> None:
    """The program's entry point: ``main`` then exit, skipping the interpreter's teardown."""
    gc.set_threshold(*GC_THRESHOLDS)
    atexit.register(_skip_teardown)  # runs last: after non-daemon threads are joined and
    code = main()                     # the atexit handlers registered after this one have run
    _exit_code[0] = code
    sys.exit(code)


#: set once main() has returned; an exception escaping it leaves the normal exit to Python
_exit_code: list[int | None] = [None]


def _skip_teardown() -> None:
    """End the process once everything that matters is done: output flushed, threads
    joined, atexit handlers run (logging's included).  What is skipped, freeing every
    object and module one by one, costs a tenth of a second after a restore or a large
    snapshot, for nothing: every file and connection of ours is closed by then.  Any
    trouble flushing leaves the normal exit to report it."""
    if _exit_code[0] is None:
        return
    try:
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        return
    os._exit(_exit_code[0])

