"""`safeckpt demo`: the whole story in a temporary directory, checked as it goes.

Each step prints what a user would type (``$`` for the shell, ``>>>`` for
Python), runs it through the same code the commands use, and checks the
result. The demo exits 1 if any check fails, so it doubles as a smoke test.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import click
from rich.console import Console
from rich.text import Text

from .. import __version__
from ..api import safe_open
from ..format.reader import SafetensorsFile
from . import inspect, output, verify

VOCAB, DIM, LAYERS = 4096, 64, 2
ROW = 42  # the embedding row read on its own


def tiny_language_model(torch) -> Any:
    """A language-model-shaped torch module: embedding tied to the output head, pre-norm blocks,
    fp32 layer norms and bf16 linear layers."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(DIM)
            self.qkv = nn.Linear(DIM, 3 * DIM).to(torch.bfloat16)
            self.proj = nn.Linear(DIM, DIM).to(torch.bfloat16)
            self.norm2 = nn.LayerNorm(DIM)
            self.up = nn.Linear(DIM, 4 * DIM).to(torch.bfloat16)
            self.down = nn.Linear(4 * DIM, DIM).to(torch.bfloat16)

        def forward(self, x):
            q, k, v = self.qkv(self.norm1(x).to(torch.bfloat16)).chunk(3, dim=-1)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True)).float()
            return x + self.down(F.gelu(self.up(self.norm2(x).to(torch.bfloat16)))).float()

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = nn.LayerNorm(DIM)
            self.head = nn.Linear(DIM, VOCAB, bias=False)
            self.head.weight = self.embed.weight  # tied, as in most language models

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    return TinyLM


class Story:
    """Prints steps, commands and checks; counts failed checks."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.steps = 0
        self.checks = 0
        self.failed: list[str] = []
        utf = console.encoding.lower().startswith("utf")
        self._marks = ("✓", "✗") if utf else ("+", "x")

    def step(self, title: str) -> None:
        self.steps += 1
        self.console.print()
        self.console.print(Text(f"{self.steps}. {title}", style="bold"))

    def shell(self, *commands: str) -> None:
        for command in commands:
            self.console.print(Text(f"$ {command}", style="cyan"))

    def python(self, *lines: str) -> None:
        for i, line in enumerate(lines):
            self.console.print(Text(f"{'>>>' if i == 0 or not line.startswith(' ') else '...'} {line}",
                                    style="cyan"))

    def say(self, text: str, style: Optional[str] = None) -> None:
        self.console.print(Text(text, style=style or ""))

    def check(self, passed: bool, what: str) -> bool:
        self.checks += 1
        if passed:
            self.console.print(Text(f"  {self._marks[0]} {what}", style="green"))
        else:
            self.failed.append(what)
            self.console.print(Text(f"  {self._marks[1]} {what}", style="bold red"))
        return passed


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def run_story(story: Story, workdir: Path, torch) -> None:
    """The demo's steps; each check is recorded in `story`."""
    from ..torch import load_model, save_model  # imports torch

    TinyLM = tiny_language_model(torch)
    story.shell(f"cd {_q(workdir)}")
    model_path = Path("model.safetensors")  # the demo runs in `workdir`: paths read as a user types them

    story.step("Build a tiny language model")
    torch.manual_seed(0)
    model = TinyLM().train(False)
    state = model.state_dict()
    story.python("model = TinyLM()  # embedding tied to the head, bf16 linear layers, fp32 norms")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    parameters = sum(p.numel() for p in model.parameters())
    story.say(f"{len(state)} state-dict entries (two of them the tied weight), "
              f"{output.grouped(parameters)} parameters "
              f"({output.human_count(parameters)}), dtypes {', '.join(dtypes)}")
    story.check(model.head.weight is model.embed.weight, "head.weight is embed.weight (tied)")

    story.step("Save it with safeckpt")
    story.python("from safeckpt.torch import save_model", f"save_model(model, {str(model_path)!r})")
    save_model(model, model_path)
    with safe_open(model_path) as f:
        keys, metadata = f.keys(), f.metadata()
    story.check("head.weight" not in keys and "embed.weight" in keys,
                "the tied weight is stored once (as embed.weight)")
    story.check(metadata == {"head.weight": "embed.weight"},
                f"the tie is recorded in the metadata: {metadata}")

    story.step("Inspect it (reads the header only)")
    story.shell(f"safeckpt inspect {_q(model_path)}")
    report = inspect.describe(model_path)
    inspect.print_description(story.console, report)
    story.check(report["totals"]["parameters"] == parameters,
                f"{output.grouped(parameters)} parameters in the file, as in the model")

    story.step("Verify it")
    story.shell(f"safeckpt verify {_q(model_path)}")
    result = verify.check_file(model_path)
    story.say(result.line())
    story.check(result.exit_code == output.EXIT_OK, "valid: exit code 0")

    story.step("Load it back into a fresh model")
    story.python("from safeckpt.torch import load_model", "fresh = TinyLM()",
                 f"load_model(fresh, {str(model_path)!r})")
    torch.manual_seed(1)
    fresh = TinyLM().train(False)
    outcome = load_model(fresh, model_path)
    story.say(repr(outcome))
    story.check(outcome == (set(), []), "no missing or unexpected keys")
    loaded = fresh.state_dict()
    story.check(all(torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
                    for name, tensor in state.items()),
                f"all {len(state)} tensors equal, with their dtypes")
    story.check(fresh.head.weight is fresh.embed.weight, "the head is still tied to the embedding")
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        story.check(torch.equal(fresh(ids), model(ids)), "the same logits on a random prompt")

    story.step("Read one row without reading the rest")
    story.python(f"with safe_open({str(model_path)!r}, framework='pt', backend='pread') as f:",
                 f"    row = f.get_slice('embed.weight')[{ROW}]")
    with safe_open(model_path, framework="pt", backend="pread") as f:
        row = f.get_slice("embed.weight")[ROW]
    story.check(torch.equal(row, model.embed.weight[ROW].detach()),
                f"row {ROW} of embed.weight, shape {list(row.shape)}")
    # safe_open reads slices through SafetensorsFile.slice, whose pread backend counts bytes.
    story.python(f"with safeckpt.SafetensorsFile({str(model_path)!r}, backend='pread') as f:",
                 f"    f.slice('embed.weight', {ROW}); f.bytes_read")
    with SafetensorsFile(model_path, backend="pread") as f:
        f.slice("embed.weight", ROW)
        read = f.bytes_read
    size = model_path.stat().st_size
    story.say(f"{read} bytes of tensor data read, of a {output.grouped(size)}-byte file")
    story.check(read == DIM * 4, f"only the row's {DIM} float32 values ({DIM * 4} bytes) were read")

    story.step("Same bytes as the reference implementation")
    reference_path = Path("reference.safetensors")
    try:
        from safetensors.torch import save_model as reference_save_model
    except ImportError:
        story.say("skipped: the `safetensors` package is not installed (pip install safetensors)", "yellow")
    else:
        story.python("import safetensors.torch",
                     f"safetensors.torch.save_model(model, {str(reference_path)!r})")
        reference_save_model(model, str(reference_path))
        story.shell(f"cmp {_q(model_path)} {_q(reference_path)}")
        story.check(model_path.read_bytes() == reference_path.read_bytes(),
                    "byte-identical to safetensors' own save_model")

    story.step("Damaged files are refused, with the reason")
    data = model_path.read_bytes()
    truncated = Path("truncated.safetensors")
    truncated.write_bytes(data[:-100])
    story.shell(f"head -c {len(data) - 100} {_q(model_path)} > {_q(truncated)}  # an interrupted download")
    _refused(story, truncated, "OffsetOutOfBoundsError")

    tampered = Path("tampered.safetensors")
    old, new = f'"shape":[{VOCAB},{DIM}]'.encode(), f'"shape":[{VOCAB},{DIM + 1}]'.encode()
    tampered.write_bytes(data.replace(old, new, 1))
    story.say(f"# {tampered.name}: a copy whose header says embed.weight is [{VOCAB}, {DIM + 1}]")
    _refused(story, tampered, "SizeMismatchError")

    pickled = Path("pickled.safetensors")
    story.python(f"torch.save(model.state_dict(), {str(pickled)!r})  # a pickle under the wrong name")
    torch.save(model.state_dict(), pickled)
    _refused(story, pickled, "WrongFormatError")
    story.say("(the format has no checksums: verify checks structure; a bit flipped inside tensor data "
              "keeps the file valid)", "dim")

    _pickled_checkpoints(story, model, state, torch)


def _pickled_checkpoints(story: Story, model: Any, state: dict, torch) -> None:
    """A torch.save training checkpoint: read without running it, a planted payload caught, converted."""
    from ..ops.convert import convert
    from ..ops.scan import scan
    from ..sources import open_source

    story.step("A PyTorch training checkpoint, read without running it")
    checkpoint = Path("checkpoint.pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    story.python("optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)",
                 f"torch.save({{'model': model.state_dict(), 'optimizer': optimizer.state_dict(), "
                 f"'epoch': 3}}, {str(checkpoint)!r})")
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": 3}, checkpoint)
    story.shell(f"safeckpt scan {_q(checkpoint)}")
    report = scan(checkpoint)
    story.say(f"{checkpoint}: {report.verdict} ({len(report.globals)} globals named, all allowlisted)")
    story.check(report.verdict == "safe", "scan verdict: safe")
    story.python(f"src = safeckpt.open_source({str(checkpoint)!r})  # torch is not used to read it")
    with open_source(checkpoint) as src:
        story.say(src.describe())
        story.check(src.tree["epoch"] == 3 and src.tree["optimizer"]["param_groups"][0]["lr"] == 3e-4,
                    "epoch and optimizer settings come out as plain data")
        story.check(all(src.read(f"model.{name}").tobytes() == _bytes_of(tensor)
                        for name, tensor in state.items() if f"model.{name}" not in src.aliases),
                    "every tensor equals the model's, read zero-copy from the file")

    story.step("A planted payload is caught, and never runs")
    planted, canary = Path("planted.pt"), Path("PWNED")
    _plant_payload(checkpoint, planted, f"touch {canary}")
    story.say(f"# {planted}: the same checkpoint whose pickle also calls os.system('touch {canary}')")
    story.shell(f"safeckpt scan {_q(planted)}")
    report = scan(planted)
    worst = next(f for f in report.findings if f.severity == "malicious")
    story.say(f"{planted}: {report.verdict}: {worst.what} at {worst.member}@{worst.offset}: {worst.why}", "red")
    story.check(report.verdict == "malicious" and report.exit_code() == output.EXIT_INVALID,
                "scan verdict: malicious, exit code 1")
    story.shell(f"safeckpt convert {_q(planted)} planted.safetensors")
    try:
        convert(planted, "planted.safetensors")
        refused = False
    except Exception as exc:  # noqa: BLE001 - the refusal is the expected outcome
        refused = type(exc).__name__ == "UnsafeFileError"
        story.say(output.one_line(f"REFUSED {exc}")[:160] + " ...", "red")
    story.check(refused and not Path("planted.safetensors").exists(), "convert refuses it; nothing is written")
    inspect.describe(planted)
    story.check(not canary.exists(), f"scanning, converting and inspecting never created {canary}")

    story.step("Convert the checkpoint to sharded safetensors, verified")
    out = Path("converted")
    story.shell(f"safeckpt convert {_q(checkpoint)} {out}/ --extract model --shard-size 300KB --verify")
    story.python(f"result = safeckpt.convert({str(checkpoint)!r}, {str(out)!r}, extract='model', "
                 "shard_size='300KB', verify=True)")
    result = convert(checkpoint, out, extract="model", shard_size="300KB", verify=True)
    story.say(f"{result.tensors} tensors in {len(result.outputs)} shards + {Path(result.index).name}; "
              f"ties kept: {result.aliases}")
    story.check(len(result.outputs) > 1 and result.verified, "sharded, every tensor re-read and compared")
    fresh = type(model)().train(False)
    story.python("from safeckpt.torch import load_file", "fresh = TinyLM()",
                 "weights = {}", "for shard in result.outputs:", "    weights.update(load_file(shard))",
                 "fresh.load_state_dict(weights, strict=False)")
    from ..torch import load_file
    loaded = {}
    for shard in result.outputs:
        loaded.update(load_file(shard))
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    story.check(list(missing) == ["head.weight"] and not unexpected,
                "loads into a fresh model; only the tied head.weight is left to the tie")
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        story.check(torch.equal(fresh(ids), model(ids)), "the same logits as the original model")


def _bytes_of(tensor) -> bytes:
    from ..frameworks.torch import to_numpy
    return to_numpy(tensor.detach().contiguous()).tobytes()


def _plant_payload(source: Path, target: Path, command: str) -> None:
    """Copy a torch.save zip, adding to its data.pkl a call of os.system(command) (as a dict item)."""
    import struct
    import zipfile

    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            data = original.read(info)
            if info.filename.endswith("/data.pkl"):  # ... SETITEMS STOP -> ... SETITEMS key call SETITEM STOP
                arg = command.encode()
                data = (data[:-1] + b"X" + struct.pack("<I", 3) + b"run" + b"cposix\nsystem\n"
                        + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85Rs.")
            out.writestr(info, data)


def _refused(story: Story, path: Path, expected: str) -> None:
    story.shell(f"safeckpt verify {_q(path)}")
    result = verify.check_file(path)
    story.say(result.line(), "red")
    story.check(result.exit_code == output.EXIT_INVALID and result.error_type == expected
                and str(path) in (result.error or ""),
                f"refused ({result.error_type}), exit code {result.exit_code}")


EXIT_CODES = output.exit_codes_help(
    ok="every check passed", invalid="a check failed (listed at the end)",
    error="PyTorch is not installed (pip install torch), or the command line is wrong")


@click.command("demo", short_help="Tour safeckpt end to end on a tiny model, checking each step.",
               epilog=EXIT_CODES)
@click.option("--dir", "parent", type=click.Path(file_okay=False, path_type=Path),
              help="Create the demo's directory here instead of the system temporary directory.")
@click.option("--keep", is_flag=True, help="Keep the files the demo wrote (their directory is printed).")
def command(parent: Optional[Path], keep: bool) -> None:
    """Run an end-to-end tour of safeckpt on a tiny model, checking every step.

    Builds a small torch language model (tied embedding, bf16 and fp32
    weights), saves it, inspects and verifies the file, loads it back and
    compares, reads one row alone, compares the bytes with the `safetensors`
    package (if installed), and shows damaged files being refused. Then a
    torch.save training checkpoint: scanned and read without running it, a
    planted payload caught and refused, and the checkpoint converted to
    sharded, verified safetensors that load back into the model. Each step
    prints the command you would type. Takes a few seconds; needs PyTorch.

    \b
    Examples:
      safeckpt demo
      safeckpt demo --dir . --keep     # keep the files to try the commands yourself
    """
    try:
        import torch
    except ImportError:
        output.exit_with(output.EXIT_ERROR, "error: the demo needs PyTorch: pip install torch")
    try:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="safeckpt-demo-", dir=parent))
    except OSError as exc:
        output.exit_with(output.EXIT_ERROR, f"error: cannot create the demo's directory in {parent}: "
                                            f"{exc.strerror or exc}")
    console = output.make_console()
    story = Story(console)
    story.say(f"safeckpt {__version__} demo", "bold")
    try:
        with _inside(workdir):
            run_story(story, workdir, torch)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported in one line
        if os.environ.get(output.TRACEBACK_ENV):
            raise
        story.check(False, f"step {story.steps} stopped: {type(exc).__name__}: {output.one_line(str(exc))}")
    finally:
        if keep:
            story.console.print()
            story.say(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print()
    if story.failed:
        story.say(f"{len(story.failed)} of {story.checks} checks failed:", "bold red")
        for what in story.failed:
            story.say(f"  {what}", "red")
        raise SystemExit(output.EXIT_INVALID)
    story.say(f"All {story.checks} checks passed.", "bold green")
