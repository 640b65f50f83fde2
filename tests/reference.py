"""Independent reference code for the end-to-end tests: launching dist_quant as a real
process, reading its output directory, our own int32 unpacker, round-to-nearest from the
documented formulas, and the calibration activations of layer 0.

Nothing here imports ``dist_quant``: the tests compare the tool against this code."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
QUANT_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# -- running the tool -------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (sockets held until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def command(overrides: list[str], nproc: int = 1, port: int | None = None) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dist_quant", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "dist_quant", *overrides]


def check_done(job) -> Path:
    """``job.out`` of a run that exited 0 and printed ``done: <out>`` (fails the calling test
    otherwise, with the ends of its stdout and stderr). ``job`` has name, returncode, stdout,
    stderr and out."""
    assert job.returncode == 0, (f"{job.name}: exit {job.returncode}\n--- stdout\n{job.stdout[-3000:]}"
                                 f"\n--- stderr\n{job.stderr[-6000:]}")
    assert f"done: {job.out}" in job.stdout, job.stdout
    return job.out


@dataclass
class Job:
    name: str
    argv: list[str]
    out: Path
    run_dir: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def start(self) -> "Job":
        self._t0 = time.time()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        return self

    def wait(self, timeout: float = 600) -> "Job":
        if self.proc is not None:
            try:
                self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.stdout, self.stderr = self.proc.communicate()
            self.returncode = self.proc.returncode
            self.seconds = time.time() - self._t0
            self.proc = None
        return self

    def check(self) -> Path:
        """The output dir of a successful run (fails the calling test otherwise)."""
        return check_done(self)


def make_job(name: str, model: Path, out: Path, run_dir: Path, calib: Path, quant: str,
             extra: tuple[str, ...] = (), nproc: int = 1, port: int | None = None,
             num_samples: int = 16, seq_len: int = 64) -> Job:
    overrides = [f"model.path={model}", f"quant={quant}", f"calib.path={calib}",
                 f"calib.num_samples={num_samples}", f"calib.seq_len={seq_len}", f"output.dir={out}",
                 "output.part_file_size=100KB", f"runtime.run_dir={run_dir}", "runtime.threads=1", *extra]
    return Job(name, command(overrides, nproc, port), out, run_dir)


def small_calib_file(path: Path, source: Path, chars: int = 40_000) -> Path:
    path.write_text(source.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


def hash_dir(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


# -- reading checkpoints ----------------------------------------------------------------------
def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``directory`` (names must be unique)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                assert name not in out, f"{name} is in two files"
                out[name] = fh.get_tensor(name)
    return out


def part_file_contents(directory: Path) -> dict[str, list[str]]:
    contents = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            contents[f.name] = list(fh.keys())
    return contents


def header_data_bytes(path: Path) -> int:
    """Bytes of tensor data that a safetensors file's header declares."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def quantized_linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed"))


# -- our own unpacker and dequantization -------------------------------------------------------
def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Signed integers from the dense little-endian bit stream of ``packed`` along ``dim``:
    element ``i`` of a row occupies stream bits ``[i·bits, (i+1)·bits)``, stream bit ``k`` is
    bit ``k % 32`` of word ``k // 32``; stored values are offset by ``2^(bits-1)``."""
    assert packed.dtype == torch.int32 and packed.dim() == 2
    rows = packed if dim == 1 else packed.T
    words = rows.to(torch.int64) & 0xFFFFFFFF
    n_rows, n_words = words.shape
    assert n_words * 32 >= length * bits and (n_words - 1) * 32 < length * bits, (n_words, length, bits)
    stream = (words[:, :, None] >> torch.arange(32)) & 1  # [rows, words, 32], lowest bit first
    stream = stream.reshape(n_rows, n_words * 32)[:, : length * bits].reshape(n_rows, length, bits)
    values = (stream << torch.arange(bits)).sum(dim=-1) - (1 << (bits - 1))
    return values if dim == 1 else values.T


@dataclass
class QuantLinear:
    q: torch.Tensor  # int64 [out, in]
    scale: torch.Tensor  # [out, groups], as stored
    zero: torch.Tensor  # int64 [out, groups] (zeros when symmetric)
    shape: tuple[int, int]

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q − zero) · scale`` per group, in float32 (as a loader would)."""
        return ((self.q - self.expand(self.zero)).to(torch.float32) * self.expand(self.scale).float()).to(dtype)


def read_quant_linear(tensors: dict[str, torch.Tensor], name: str, bits: int) -> QuantLinear:
    shape = tuple(int(v) for v in tensors[name + ".weight_shape"].tolist())
    out_f, in_f = shape
    q = unpack_int32(tensors[name + ".weight_packed"], bits, in_f, dim=1)
    scale = tensors[name + ".weight_scale"]
    if name + ".weight_zero_point" in tensors:
        zero = unpack_int32(tensors[name + ".weight_zero_point"], bits, out_f, dim=0)
    else:
        zero = torch.zeros(scale.shape, dtype=torch.int64)
    assert q.shape == (out_f, in_f) and zero.shape == scale.shape
    return QuantLinear(q, scale, zero, shape)


def read_quant_linears(directory: Path, bits: int) -> tuple[dict[str, QuantLinear], dict[str, torch.Tensor]]:
    tensors = read_tensors(directory)
    return {n: read_quant_linear(tensors, n, bits) for n in quantized_linears(tensors)}, tensors


# -- reference round-to-nearest ----------------------------------------------------------------
def reference_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: torch.dtype = torch.float32) -> QuantLinear:
    """RTN from the documented formulas (vectorized, float32 arithmetic)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    cols = in_f if group_size == -1 else group_size
    g = w.float().reshape(out_f, in_f // cols, cols)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((qmax - qmin) / 2)
    else:
        scale = (hi.clamp(min=0) - lo.clamp(max=0)) / (qmax - qmin)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps).to(scale_dtype).float()
    if symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (qmin - torch.round(lo.clamp(max=0) / scale)).clamp(qmin, qmax)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
    return QuantLinear(q.reshape(out_f, in_f).long(), scale.to(scale_dtype), zero.long(), (out_f, in_f))


# -- layer-0 calibration activations -------------------------------------------------------------
def calibration_ids(model_dir: Path, calib: Path, num_samples: int, seq_len: int) -> torch.Tensor:
    """The first ``num_samples × seq_len`` tokens of the text file, as [num_samples, seq_len]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(Path(calib).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    need = num_samples * seq_len
    assert len(ids) >= need
    return torch.tensor(ids[:need]).reshape(num_samples, seq_len)


def layer0_attn_input(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """``input_layernorm(embed(ids))`` of decoder layer 0 (RMSNorm), [tokens, hidden], float64."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tensors = read_tensors(model_dir)
    x = tensors["model.embed_tokens.weight"].double()[ids.reshape(-1)]
    norm = tensors["model.layers.0.input_layernorm.weight"].double()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + config["rms_norm_eps"])
    return x * norm


def relative_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``‖X(W−Ŵ)ᵀ‖ / ‖XWᵀ‖`` (Frobenius)."""
    w, w_hat = w.double(), w_hat.double()
    return float((x @ (w - w_hat).T).norm() / (x @ w.T).norm())


def relative_weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w.double() - w_hat.double()).norm() / w.double().norm())
