"""Upload exports to the Hugging Face Hub: adapters, merged folders and GGUF files.

Each push saves into a temporary folder with the same writers the local saves use, then creates
the repository (private unless ``private=False``) and uploads the folder in one commit through
``huggingface_hub.HfApi``. The token comes from the argument, else ``HF_TOKEN``, else the token
``huggingface-cli login`` stored.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_repo_id(repo_id: str) -> str:
    """``org/name`` or ``name`` (the token's own namespace), in the characters the Hub allows."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or len(repo_id) > 96 or ".." in repo_id:
        raise ValueError(
            f"repo_id={repo_id!r} is not a Hub repository name; use 'your-name/model-name' "
            "(letters, digits, '-', '_' and '.')"
        )
    return repo_id


def resolve_token(token: str | None) -> str:
    """The token to upload with: the argument, else ``HF_TOKEN``, else the stored login."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env:
        return env
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # an unreadable token file is the same as none here
        stored = None
    if stored:
        return stored
    raise ValueError(
        "uploading needs a Hugging Face token with write access: pass token='hf_...' (--token on the "
        "command line), set HF_TOKEN, or run `huggingface-cli login` once"
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str = "Upload with hizli",
) -> str:
    """Create ``repo_id`` if needed (private by default) and upload every file in ``folder``.

    Returns:
        The repository's URL.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ValueError(f"nothing to upload: {str(folder)!r} is not a folder with files")
    api = HfApi(token=resolve_token(token))
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    repo = getattr(url, "repo_id", None) or repo_id
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=commit_message)
    return str(url)


def push_merged(
    model,
    repo_id: str,
    tokenizer=None,
    save_method: str = "merged_16bit",
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str | None = None,
    **save_kwargs: Any,
) -> str:
    """Merge (``save_method`` as in ``save_pretrained_merged``) and upload the folder."""
    from hizli.export.merge import normalize_save_method, save_merged

    check_repo_id(repo_id)
    method = normalize_save_method(save_method)
    resolve_token(token)  # fail before minutes of merging, not after
    with tempfile.TemporaryDirectory(prefix="hizli-push-") as tmp:
        out = Path(tmp) / "model"
        save_merged(model, out, tokenizer, save_method=method, **save_kwargs)
        return push_folder(
            out,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message or f"Upload {method} model with hizli",
        )


def push_gguf(
    model,
    repo_id: str,
    tokenizer=None,
    quantization_method: Any = "q8_0",
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str | None = None,
    **save_kwargs: Any,
) -> str:
    """Write GGUF file(s) and the Ollama Modelfile, and upload them."""
    from hizli.export.gguf import save_gguf

    check_repo_id(repo_id)
    resolve_token(token)
    save_kwargs.setdefault("file_stem", repo_id.rsplit("/", 1)[-1])
    with tempfile.TemporaryDirectory(prefix="hizli-push-") as tmp:
        out = Path(tmp) / "gguf"
        save_gguf(model, out, tokenizer, quantization_method=quantization_method, **save_kwargs)
        return push_folder(
            out, repo_id, token=token, private=private, commit_message=commit_message or "Upload GGUF with hizli"
        )


def push_adapter(
    model,
    repo_id: str,
    tokenizer=None,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str | None = None,
    **_: Any,
) -> str:
    """Upload the LoRA adapter (PEFT format) and the tokenizer."""
    return push_merged(
        model,
        repo_id,
        tokenizer,
        save_method="lora",
        token=token,
        private=private,
        commit_message=commit_message or "Upload LoRA adapter with hizli",
    )
