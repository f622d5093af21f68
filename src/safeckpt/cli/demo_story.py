"""The steps of `safeckpt demo`: a tiny language model's life, from pickles to training checkpoints.

The story: a torch ``.pt`` and a real Lightning ``.ckpt`` are scanned (and a
planted payload caught), inspected, converted to sharded safetensors and
verified, diffed against the original; the model is saved byte-identical to
the reference implementation; a short training run keeps checkpoints with
`CheckpointManager`, two of them are diffed (with a plot), averaged with
`merge` and the run resumed; damage is found and named. Commands run through
the real CLI (``$`` lines), Python through the library (``>>>`` lines), and
every outcome is checked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from . import output

VOCAB, DIM, LAYERS, CONTEXT = 4096, 64, 4, 32
TRAIN_STEPS, SAVE_EVERY = 30, 10
SHARD_SIZE = "400KB"


def tiny_language_model(torch) -> Any:
    """A language-model-shaped torch module class: embedding tied to the output head, pre-norm
    blocks, fp32 layer norms and bf16 linear layers."""
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
            nn.init.normal_(self.embed.weight, std=DIM ** -0.5)  # logits of a sensible size

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    return TinyLM


def run_story(story, torch) -> None:
    """Every step, in order; `story` (a `demo.Story`) prints and records the checks."""
    TinyLM = tiny_language_model(torch)
    torch.manual_seed(0)
    batches = [torch.randint(0, VOCAB, (8, CONTEXT + 1)) for _ in range(4)]
    model = _build(story, TinyLM)
    lightning_model = _legacy_checkpoints(story, TinyLM, model, batches, torch)
    _planted_payload(story)
    _inspect(story)
    _convert_and_verify(story, TinyLM, lightning_model, torch)
    _reference_bytes(story, model)
    manager, final_weights = _training_run(story, TinyLM, batches, torch)
    _diff_checkpoints(story)
    _merge_checkpoints(story, TinyLM, torch)
    _resume(story, TinyLM, manager, final_weights, batches, torch)
    _damage(story)


# --- the steps -----------------------------------------------------------------------

def _build(story, TinyLM) -> Any:
    story.step("A tiny language model")
    model = TinyLM().train(False)
    state = model.state_dict()
    story.python("model = TinyLM()  # embedding tied to the head, bf16 linear layers, fp32 norms")
    parameters = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    story.say(f"{len(state)} state-dict entries, {output.grouped(parameters)} parameters "
              f"({output.human_count(parameters)}), dtypes {', '.join(dtypes)}")
    story.check(model.head.weight is model.embed.weight, "head.weight is embed.weight (tied)")
    return model


def _legacy_checkpoints(story, TinyLM, model, batches, torch) -> Any:
    story.step("Checkpoints as PyTorch and Lightning write them (pickles)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    story.python("torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 3},",
                 "           'checkpoint.pt')")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, "checkpoint.pt")
    lightning_model = _lightning_checkpoint(story, TinyLM, batches, torch)
    story.shell("safeckpt scan checkpoint.pt tinylm.ckpt")
    code = story.cli("scan", "checkpoint.pt", "tinylm.ckpt")
    story.check(code == output.EXIT_OK, "both are safe: every class they name is on the allowlist")
    return lightning_model


def _lightning_checkpoint(story, TinyLM, batches, torch) -> Any:
    """tinylm.ckpt from a real Lightning Trainer (or the same layout by torch.save without Lightning)."""
    try:
        with _quiet():
            import lightning as L
    except ImportError:
        L = None
    if L is None:
        story.say("(Lightning is not installed: tinylm.ckpt gets a Lightning checkpoint's layout from "
                  "torch.save instead)", "yellow")
        net = TinyLM().train(False)
        torch.save({"epoch": 0, "global_step": 8, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                    "hyper_parameters": {"lr": 1e-3, "layers": LAYERS}}, "tinylm.ckpt")
        return net

    class LitLM(L.LightningModule):
        def __init__(self, lr: float = 1e-3, layers: int = LAYERS) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = TinyLM()

        def training_step(self, batch, _):
            (ids,) = batch
            logits = self.net(ids[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    story.python("trainer = lightning.Trainer(max_steps=8)",
                 "trainer.fit(LitLM(lr=1e-3), data)  # LitLM wraps TinyLM as self.net",
                 "trainer.save_checkpoint('tinylm.ckpt')")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(batches)), batch_size=4)
    with _quiet():
        trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=".")
        lit = LitLM(lr=1e-3)
        trainer.fit(lit, data)
        trainer.save_checkpoint("tinylm.ckpt")
    return lit.net.train(False)


def _planted_payload(story) -> None:
    from ..ops.convert import convert
    from ..ops.scan import scan

    story.step("A planted payload is caught, and never runs")
    planted, canary = Path("planted.pt"), Path("PWNED")
    plant_payload(Path("checkpoint.pt"), planted, f"touch {canary}")
    story.say(f"# {planted}: checkpoint.pt with one more pickle call, os.system('touch {canary}')")
    story.shell(f"safeckpt scan {planted}")
    code = story.cli("scan", str(planted))
    story.check(code == output.EXIT_INVALID and scan(planted).verdict == "malicious",
                "scan verdict: malicious (exit code 1), naming the call and where it is")
    story.shell(f"safeckpt convert {planted} planted.safetensors")
    try:
        convert(planted, "planted.safetensors")
        refused = False
    except Exception as exc:  # noqa: BLE001 - the refusal is the expected outcome
        refused = type(exc).__name__ == "UnsafeFileError"
        story.say((output.ERROR_PREFIX + output.one_line(output.cli_spelling(str(exc))))[:150] + " ...", "red")
    story.check(refused and not Path("planted.safetensors").exists(), "convert refuses it; nothing is written")
    story.check(not canary.exists(), f"scanning and converting never created {canary}")


def _inspect(story) -> None:
    from ..ops.inspect import describe

    story.step("Inspect the Lightning checkpoint (structure only; nothing runs)")
    story.shell("safeckpt inspect tinylm.ckpt")
    code = story.cli("inspect", "tinylm.ckpt")
    report = describe("tinylm.ckpt")
    patterns = [group["pattern"] for group in report.get("groups", [])]
    story.check(code == output.EXIT_OK and any("{0..%d}" % (LAYERS - 1) in p for p in patterns),
                f"the {LAYERS} blocks fold into one row per weight")
    hyper = (report.get("structure") or {}).get("hyper_parameters", {})
    story.check(hyper.get("lr") == 1e-3 and report.get("scan", {}).get("verdict") == "safe",
                "hyper-parameters come out as data, and the scan verdict is shown")


def _convert_and_verify(story, TinyLM, lightning_model, torch) -> None:
    from ..ops.diff import diff
    from ..ops.verify import verify
    from ..torch import load_file

    story.step("Convert it to sharded safetensors, verified, with a hash manifest")
    story.shell(f"safeckpt convert tinylm.ckpt converted/ --shard-size {SHARD_SIZE} --verify")
    code = story.cli("convert", "tinylm.ckpt", "converted/", "--shard-size", SHARD_SIZE, "--verify")
    shards = sorted(Path("converted").glob("*.safetensors"))
    story.check(code == output.EXIT_OK and len(shards) > 1,
                f"{len(shards)} shards and an index; every tensor re-read and compared before renaming")
    story.shell("safeckpt verify converted/ --write", "safeckpt verify converted/")
    written = story.cli("verify", "converted/", "--write")
    checked = story.cli("verify", "converted/")
    report = verify("converted")
    story.check(written == checked == output.EXIT_OK and report.ok and report.hashes == "verified",
                "blake3 of every tensor and file recorded beside the model, then checked")

    story.step("Same numbers: diff across formats, and the same logits")
    story.shell("safeckpt diff tinylm.ckpt converted/")
    code = story.cli("diff", "tinylm.ckpt", "converted/")
    story.check(code == output.EXIT_OK and diff("tinylm.ckpt", "converted").identical,
                "every tensor of the .ckpt equals its converted copy (state_dict. prefix and the tie resolved)")
    story.python("weights = safeckpt.torch.load_file('converted/model-00001-of-...')  # each shard",
                 "model.load_state_dict(weights, strict=False)")
    weights: dict = {}
    for shard in shards:
        weights.update(load_file(shard))
    fresh = TinyLM().train(False)
    missing, unexpected = fresh.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()},
                                                strict=False)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        same = torch.equal(fresh(ids), lightning_model(ids))
    story.check(list(missing) == ["head.weight"] and not unexpected and same,
                "loads into a fresh model (the tied head follows the embedding): the same logits")


def _reference_bytes(story, model) -> None:
    from ..torch import save_model

    story.step("Byte-identical to the reference implementation")
    story.python("safeckpt.torch.save_model(model, 'model.safetensors')",
                 "safetensors.torch.save_model(model, 'reference.safetensors')")
    save_model(model, "model.safetensors")
    try:
        from safetensors.torch import save_model as reference_save_model
    except ImportError:
        story.say("skipped: the `safetensors` package is not installed (pip install safetensors)", "yellow")
        return
    reference_save_model(model, "reference.safetensors")
    story.shell("cmp model.safetensors reference.safetensors")
    story.check(Path("model.safetensors").read_bytes() == Path("reference.safetensors").read_bytes(),
                "the same bytes as safetensors' own save_model")


def _training_run(story, TinyLM, batches, torch) -> tuple[Any, dict]:
    from ..torch import training_state
    from ..training.manager import CheckpointManager

    story.step(f"Train {TRAIN_STEPS} steps, checkpointing every {SAVE_EVERY} (no pickle anywhere)")
    story.python("mgr = safeckpt.CheckpointManager('run', keep_last=3, every_n_steps=10)",
                 "for step in range(1, 31):",
                 "    loss = train_step(model, optimizer)",
                 "    mgr.save(step, training_state(model, optimizer, scheduler), metrics={'loss': loss})")
    torch.manual_seed(1)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TRAIN_STEPS * 2)
    manager = CheckpointManager("run", keep_last=3, every_n_steps=SAVE_EVERY)
    for step in range(1, TRAIN_STEPS + 1):
        loss = train_step(model, optimizer, scheduler, batches[step % len(batches)], torch)
        manager.save(step, training_state(model, optimizer, scheduler, extra={"step": step}),
                     metrics={"loss": loss})
    manager.wait()
    story.shell("safeckpt ls run/")
    code = story.cli("ls", "run/")
    steps = [info.step for info in manager.list()]
    story.check(code == output.EXIT_OK and steps == [10, 20, 30],
                "three checkpoints, each committed atomically with its manifest")
    return manager, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_step(model, optimizer, scheduler, batch, torch) -> float:
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _diff_checkpoints(story) -> None:
    from ..ops.diff import diff

    story.step("What training changed: diff two checkpoints, with a plot")
    first, last = "run/step-00000010/tensors.safetensors", "run/step-00000030/tensors.safetensors"
    plot = ["--plot", "diff.png"] if importlib.util.find_spec("matplotlib") else []
    if not plot:
        story.say("(matplotlib is not installed: no plot; pip install 'safeckpt[plot]')", "yellow")
    story.shell(f"safeckpt diff {first} {last} --select 'model/*' {' '.join(plot)}".rstrip())
    code = story.cli("diff", first, last, "--select", "model/*", *plot)
    report = diff(first, last, select="model/*")
    changed = [e for e in report.entries if e.status == "changed"]
    story.check(code == output.EXIT_INVALID and changed and all(e.rel_l2 and e.rel_l2 > 0 for e in changed),
                f"{len(changed)} model tensors changed (exit code 1: they differ), each with its relative change")
    if plot:
        story.check(Path("diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n",
                    "diff.png: relative change per layer, ordered by layer")


def _merge_checkpoints(story, TinyLM, torch) -> None:
    import numpy as np

    from ..api import load_file

    story.step("Average the last three checkpoints (a checkpoint soup)")
    inputs = [f"run/step-{step:08d}/tensors.safetensors" for step in (10, 20, 30)]
    story.shell("safeckpt merge run/step-*/tensors.safetensors -o averaged.safetensors")
    code = story.cli("merge", *inputs, "-o", "averaged.safetensors")
    averaged = load_file("averaged.safetensors")
    name = "model/blocks.0.up.weight"
    values = [load_file(path)[name].astype(np.float32) for path in inputs]
    expected = ((values[0] + values[1] + values[2]) / 3).astype(averaged[name].dtype)
    story.check(code == output.EXIT_OK and averaged[name].dtype == expected.dtype
                and np.array_equal(averaged[name].astype(np.float32), expected.astype(np.float32)),
                f"{name}: the mean of the three, accumulated in float32, written back in bf16")
    model = TinyLM()
    story.python("from safeckpt.torch import load_file",
                 "soup = {k.removeprefix('model/'): v for k, v in load_file('averaged.safetensors').items()",
                 "        if k.startswith('model/')}",
                 "model.load_state_dict(soup)")
    from ..torch import load_file as load_torch
    soup = {k.removeprefix("model/"): v for k, v in load_torch("averaged.safetensors").items()
            if k.startswith("model/")}
    result = model.load_state_dict(soup, strict=False)
    story.check(not result.unexpected_keys and set(result.missing_keys) <= {"head.weight"},
                "the averaged weights load into the model")


def _resume(story, TinyLM, manager, final_weights: dict, batches, torch) -> None:
    from ..torch import restore_training_state

    story.step("Resume the run from its latest checkpoint")
    story.python("state = mgr.restore('latest')  # blake3 hashes checked first",
                 "restore_training_state(state, model, optimizer, scheduler)")
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TRAIN_STEPS * 2)
    extra = restore_training_state(manager.restore("latest"), model, optimizer, scheduler)
    restored = model.state_dict()
    story.check(extra == {"step": TRAIN_STEPS} and all(torch.equal(restored[k], v)
                                                        for k, v in final_weights.items()),
                f"step {TRAIN_STEPS}: weights, optimizer moments, schedule and RNG as they were")
    loss = train_step(model, optimizer, scheduler, batches[0], torch)
    story.say(f"step {TRAIN_STEPS + 1}: loss {loss:.4f}")
    manager.close()


def _damage(story) -> None:
    from ..ops.verify import verify

    story.step("Damage is found, and named")
    data = Path("model.safetensors").read_bytes()
    Path("truncated.safetensors").write_bytes(data[:-100])
    story.shell("head -c -100 model.safetensors > truncated.safetensors  # an interrupted download",
                "safeckpt verify truncated.safetensors")
    code = story.cli("verify", "truncated.safetensors")
    story.check(code == output.EXIT_INVALID, "refused: the header promises bytes the file does not have")
    shard = sorted(Path("converted").glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:  # one bit flipped in the last byte of the shard: inside a tensor
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    story.say(f"# one bit flipped in the last byte of {shard}")
    story.shell("safeckpt verify converted/")
    code = story.cli("verify", "converted/")
    report = verify("converted")
    failed = report.failed_tensor or "".join(child.failed_tensor or "" for child in report.leaves())
    story.check(code == output.EXIT_INVALID and bool(failed),
                f"the manifest names the damaged tensor: {failed}")


# --- helpers ---------------------------------------------------------------------------

def plant_payload(source: Path, target: Path, command: str) -> None:
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


@contextlib.contextmanager
def _quiet():
    """Silence Lightning's banners, tips and warnings (they are not the demo's story)."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric",
                                                    "pytorch_lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
