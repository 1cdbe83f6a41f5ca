"""``covey model``: prepare model files (private, permuted-vocabulary copies; a tiny test
image pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

model_app = typer.Typer(help="Prepare model files.", no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)


@model_app.command("private")
def private_cmd(
    source: Annotated[Path, typer.Argument(help="The plain GGUF (a path, or a bundled model "
                                                "name such as smollm2-135m-instruct).")],
    target: Annotated[Path, typer.Argument(help="Where to write the private GGUF.")],
    key: Annotated[Path, typer.Option("--key", help="Permutation key file (32 random bytes "
                                      "as hex, mode 0600); made if missing.")],
) -> None:
    """Write a private copy of SOURCE for miners: token ids permuted by KEY, every
    vocabulary string removed. Keep KEY and SOURCE on the client (covey proxy); give miners
    only TARGET."""
    from covey.miner.models import ModelNotFound, resolve_model, weights_sha256
    from covey.protocol.permutation import KeyFileError, load_or_create_key, permutation

    try:
        plain = resolve_model(str(source)).path
        secret, created = load_or_create_key(key)
    except (ModelNotFound, KeyFileError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if created:
        err.print(f"created a new key in {key} (mode 0600): keep it secret and back it up; "
                  "without it the private model's answers cannot be read")
    if target.resolve() == plain.resolve():
        err.print("[red]error:[/red] TARGET must differ from SOURCE")
        raise typer.Exit(2)
    try:
        import gguf  # noqa: F401 - imported lazily below; fail here with the fix

        from covey.client.private_model import write_private_gguf
    except ImportError as exc:
        err.print("[red]error:[/red] writing GGUF files needs: pip install 'covey\\[llama]'")
        raise typer.Exit(2) from exc
    try:
        n_vocab = _vocab_size(plain)
        done = write_private_gguf(plain, target, permutation(secret, n_vocab))
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    sha = weights_sha256(target)
    err.print(f"wrote {target}: {done.n_vocab} tokens permuted in {', '.join(done.permuted)}; "
              f"{len(done.dropped)} vocabulary keys removed; sha256 {sha[:16]}…")
    err.print(f"serve it with: covey miner --model {target} --name NAME")


def _vocab_size(path: Path) -> int:
    """Rows of ``token_embd.weight`` (= llama.cpp's ``n_vocab`` for any loadable file).

    Raises:
        ValueError: the file has no such tensor.
    """
    import gguf

    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.data.shape[0])
    raise ValueError(f"{path} has no token_embd.weight tensor")


@model_app.command("tiny-diffusion")
def tiny_diffusion_cmd(
    target: Annotated[Path, typer.Argument(help="The folder to write (must not exist).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny, randomly initialised Stable Diffusion pipeline (2 MB) to TARGET, to try
    the image API and its checks without real weights: its images are coloured noise. For
    real images, serve a real Stable Diffusion folder or hf: reference."""
    if target.exists():
        err.print(f"[red]error:[/red] {target} exists; pick a new folder")
        raise typer.Exit(2)
    try:
        from covey.miner.backends.diffusers import build_tiny_pipeline
    except ImportError as exc:
        err.print("[red]error:[/red] building a pipeline needs: pip install 'covey\\[image]'")
        raise typer.Exit(2) from exc
    build_tiny_pipeline(target, seed)
    err.print(f"wrote {target}; serve it with `covey up --image-model {target}`, or add a "
              f"miner for it to a running network: covey miner --model {target}")


@model_app.command("prove-setup")
def prove_setup_cmd(
    model: Annotated[str, typer.Argument(help="A bundled scoring model name (breast-cancer-"
                                         "mlp), a scoring model folder or an .onnx file.")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="The setup folder to write (replaced if it holds a setup). Default: "
                      "FOLDER/proof, or NAME-proof beside an .onnx file.")] = None,
    srs: Annotated[Path | None, typer.Option(
        "--srs", help="A public ceremony's structured reference string (KZG, ezkl format) "
                      "to use instead of one generated here.")] = None,
) -> None:
    """Make MODEL's zero-knowledge proof setup (ezkl): circuit, proving key (for miners),
    verifying key (for everyone). Verifiers need vk.key, settings.json, kzg.srs and
    setup.json from OUT; miners need all of OUT."""
    try:
        from covey.scoring.bundled import BUNDLED_SCORING, dataset_rows, materialize
        from covey.scoring.model import MODEL_FILE, is_scoring_folder
        from covey.scoring.proofs import LOCAL_SRS, ProofError, prove_setup
    except ImportError as exc:  # pragma: no cover - the package itself is always there
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    rows = None
    path = Path(model)
    try:
        if model in BUNDLED_SCORING:
            folder = materialize(model)
            onnx_file, default_out, rows = folder / MODEL_FILE, folder / "proof", dataset_rows()
        elif path.is_dir() and is_scoring_folder(path):
            onnx_file, default_out = path / MODEL_FILE, path / "proof"
        elif path.is_file() and path.suffix == ".onnx":
            onnx_file = path
            default_out = (path.parent / "proof" if is_scoring_folder(path.parent)
                           and path.name == MODEL_FILE else path.with_name(f"{path.stem}-proof"))
        else:
            err.print(f"[red]error:[/red] {model} is neither a bundled scoring model "
                      f"({', '.join(BUNDLED_SCORING)}), a scoring folder (model.onnx + "
                      "card.json) nor an .onnx file")
            raise typer.Exit(2)
        target = out or default_out
        with err.status(f"making the proof setup of {onnx_file} (ezkl)…"):
            summary = prove_setup(onnx_file, target, srs=srs, calibration_rows=rows)
    except ImportError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except ProofError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    error = summary["max_abs_error"]
    err.print(f"wrote {target}: circuit of 2^{summary['logrows']} rows, "
              f"{summary['features']} public inputs, inputs at 2^-{summary['input_scale']}, "
              f"output at 2^-{summary['output_scale']}"
              + (" (a logit; the score is its sigmoid)" if summary["link"] == "sigmoid" else "")
              + f"; {summary['seconds']['total']:.1f} s")
    if error is not None:
        err.print(f"largest difference from onnxruntime on {summary['rows_checked']} "
                  f"calibration rows: {error:.2g}")
    err.print(f"model sha256 {summary['model_sha256']}\nverifying key sha256 "
              f"{summary['vk_sha256']}")
    err.print(f"miners serving the model need all of {target}; verifiers need its vk.key, "
              "settings.json, kzg.srs and setup.json: covey proofs verify ANSWER.json "
              f"--vk {target / 'vk.key'}")
    if summary["srs"] == LOCAL_SRS:
        err.print("[yellow]warning:[/yellow] the structured reference string (kzg.srs) was "
                  "generated on this machine: whoever generated it could forge proofs that "
                  "verify. Use it for tests and a network you run alone; a real network "
                  "loads a public ceremony's SRS with --srs PATH.")
    else:
        err.print(f"SRS: {summary['srs']}")
