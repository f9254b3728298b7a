"""``fedimaging he-decrypt``: decrypt the global model of a homomorphic-encryption job at a site.

In an HE job (``"homomorphic_encryption": {}``) the server only ever holds the global model as TenSEAL
ciphertexts; the secret key is in each site's startup kit (``startup/client_context.tenseal``), never
in the server's or an admin's. At a site, this command reads the downloaded job result, decrypts the
final global model with the site's key and writes:

- ``OUT/FL_global_model.pt``: the plain model, in the format NVFlare's PyTorch persistor writes;
- ``OUT/<job>_eval/``: a plaintext evaluation-only job with that model. Submitted like any job, it
  runs NVFlare's cross-site evaluation of the model at every site; ``fedimaging report`` and
  ``fedimaging bundle`` read its downloaded result.

The plain model leaves the site's control as soon as the evaluation job is submitted: the sites agree
to release it first (docs/homomorphic_encryption.md).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTEXT_FILE = "client_context.tenseal"
GLOBAL_MODEL_FILE = "FL_global_model.pt"
JOB_CONFIG_FILE = "fedimaging_job.json"


class HEDecryptError(RuntimeError):
    """The result, the kit or the model cannot be used; the message names the file and the fix."""


@dataclass
class DecryptedModel:
    model_file: Path
    eval_job: Path | None
    n_encrypted: int
    n_tensors: int


def _find_one(root: Path, pattern: str, what: str) -> Path:
    matches = sorted(Path(root).glob(f"**/{pattern}"))
    if not matches:
        raise HEDecryptError(f"no {pattern} below {root}: pass the downloaded (unpacked) result of the HE job ({what})")
    return matches[0]


def load_site_context(kit: Path):
    """The site's TenSEAL context (with its secret key) from ``KIT/startup/client_context.tenseal``."""
    import tenseal as ts

    path = Path(kit) / "startup" / CONTEXT_FILE
    if not path.is_file():
        raise HEDecryptError(f"{path} not found: pass the startup kit of a site provisioned with "
                             "'fedimaging provision --he' (the server and admin kits hold no secret key)")
    context = ts.context_from(path.read_bytes())
    if not context.is_private():
        raise HEDecryptError(f"{path} holds no secret key; only a site's kit can decrypt the global model")
    return context


def _plain_state(raw: dict, shapes: dict, context) -> tuple[dict, int]:
    import numpy as np
    import tenseal as ts
    import torch

    missing = sorted(set(shapes) - set(raw))
    unexpected = sorted(set(raw) - set(shapes))
    if missing or unexpected:
        raise HEDecryptError(f"the global model does not match the job's network: missing {missing}, "
                             f"unexpected {unexpected}")
    state, n_encrypted = {}, 0
    for name, shape in shapes.items():
        value = raw[name]
        if isinstance(value, (bytes, bytearray)):
            value = ts.ckks_vector_from(context, bytes(value))
        if isinstance(value, ts.CKKSVector):
            try:
                value = value.decrypt(secret_key=context.secret_key())
            except ValueError as exc:
                raise HEDecryptError(f"cannot decrypt {name}: {exc}; is the kit from the federation that ran the "
                                     "job?") from exc
            n_encrypted += 1
        array = np.asarray(value.cpu() if hasattr(value, "cpu") else value, dtype=np.float64)
        if array.size != int(np.prod(shape)):
            raise HEDecryptError(f"{name}: {array.size} values, but the job's network needs {tuple(shape)}")
        state[name] = torch.as_tensor(array.reshape(shape), dtype=torch.float32)
    return state, n_encrypted


def decrypt_global_model(result: Path, kit: Path, out: Path, *, eval_job: bool = True,
                         n_sites: int | None = None) -> DecryptedModel:
    """Decrypt the final global model of the HE job result ``result`` with the site kit ``kit`` into ``out``."""
    import torch

    result, out = Path(result), Path(out)
    model_path = _find_one(result, f"app_server/{GLOBAL_MODEL_FILE}", "final global model")
    job_path = _find_one(result, f"app_server/custom/{JOB_CONFIG_FILE}", "job configuration")
    spec = json.loads(job_path.read_text())
    if spec.get("homomorphic_encryption") is None:
        raise HEDecryptError(f"{job_path}: this job does not use homomorphic_encryption; its global model is plain "
                             "already (use fedimaging bundle on the result)")
    from fedimaging_app.config import JobConfig
    from fedimaging_app.models import build_model

    job = JobConfig.model_validate(spec)
    shapes = {name: tuple(t.shape) for name, t in build_model(job).state_dict().items()}
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=False)
    raw = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(raw, dict):
        raise HEDecryptError(f"{model_path}: not a model checkpoint (a dict of parameters)")
    state, n_encrypted = _plain_state(raw, shapes, load_site_context(kit))
    if n_encrypted == 0:
        raise HEDecryptError(f"{model_path}: no parameter is encrypted; this is not the result of an HE job")
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / GLOBAL_MODEL_FILE
    torch.save({"model": state, "train_conf": {"fedimaging": "decrypted with fedimaging he-decrypt"}}, model_file)
    job_dir = None
    if eval_job:
        job_dir = write_evaluation_job(spec, model_file, out, name=_job_name(result), n_sites=n_sites)
    return DecryptedModel(model_file, job_dir, n_encrypted, len(state))


def _job_name(result: Path) -> str:
    """``<job>_eval``, from the job name in the result's ``meta.json``."""
    meta = sorted(Path(result).glob("**/meta.json"))
    for path in meta:
        try:
            name = json.loads(path.read_text()).get("name")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(name, str) and name:
            return f"{name}_eval"
    return "he_eval"


def write_evaluation_job(spec: dict, model_file: Path, destination: Path, *, name: str,
                         n_sites: int | None = None) -> Path:
    """Write a plaintext job that only runs NVFlare's cross-site evaluation of ``model_file`` at every site.

    It is the spec's plain FedAvg job without the training workflow: the model is shipped as the
    server's ``FL_global_model.pt`` (in the app folder, where the persistor lists its global model),
    so the evaluation scores it as ``SRV_FL_global_model.pt``.
    """
    from jobs.build import export_job

    plain = {k: v for k, v in spec.items() if k != "homomorphic_encryption"}
    plain["cross_site_models"] = "global"
    kwargs = {"min_clients": n_sites} if n_sites else {}
    job_dir = export_job(name, Path(destination), num_rounds=1, spec=plain, **kwargs)
    path = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    workflows = [w for w in config["workflows"] if w["path"].endswith("CrossSiteModelEval")]
    if len(workflows) != 1:
        raise HEDecryptError(f"{path}: expected one CrossSiteModelEval workflow in the plain job")
    config["workflows"] = workflows
    path.write_text(json.dumps(config, indent=4) + "\n")
    shutil.copy2(model_file, job_dir / "app" / GLOBAL_MODEL_FILE)
    return job_dir
