"""`--push_to_hub` in `abkd-train`: check the Hub before training, explain a failed upload.

Training can take days; finding out at the end that the Hub cannot be reached (no network, no
token, a read-only token) wastes them, and an upload that fails must not take the evaluation
with it. So `abkd-train` calls `check_hub_access` before loading anything (one
`whoami` request), writes the student, its card and the report locally, and only then
uploads; `retry_upload_command` is what it prints when the upload fails.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

# Trainer.push_to_hub leaves these out of the upload (checkpoints, temporary files).
UPLOAD_IGNORE_PATTERNS = ("checkpoint-*", "_*")


class HubAccessError(RuntimeError):
    """`--push_to_hub` was asked for but the Hub cannot be written to."""


class HubUploadError(RuntimeError):
    """The final upload failed; every local file is still in `output_dir`."""


def check_hub_access(token: str | None = None) -> str:
    """Check that the Hub answers and that `token` (or the saved login) may write to it.

    Returns:
        The user name the token belongs to.

    Raises:
        HubAccessError: offline mode, no token, an invalid or read-only token, or no answer
            from the Hub; the message names the Hub and `--push_to_hub`.
    """
    endpoint = constants.ENDPOINT
    fix = (
        f"Fix it, or drop --push_to_hub and upload the output directory later "
        f"(`hf upload <repo_id> <output_dir> . {_exclude_flags()}`)."
    )
    if constants.is_offline_mode():
        raise HubAccessError(
            f"--push_to_hub needs the Hugging Face Hub ({endpoint}), but offline mode is on "
            f"(HF_HUB_OFFLINE). {fix}"
        )
    try:
        user = HfApi(endpoint=endpoint, token=token).whoami()
    except LocalTokenNotFoundError as error:
        raise HubAccessError(
            f"--push_to_hub needs a Hugging Face Hub token with write access, and none is set: "
            f"run `hf auth login`, set HF_TOKEN, or pass --hub_token. {fix}"
        ) from error
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        problem = "rejected the token" if status == 401 else f"answered {status}"
        raise HubAccessError(
            f"--push_to_hub: the Hugging Face Hub ({endpoint}) {problem}: {error}. {fix}"
        ) from error
    except Exception as error:  # no network, DNS, proxy, TLS: the HTTP client's own errors
        raise HubAccessError(
            f"--push_to_hub: cannot reach the Hugging Face Hub ({endpoint}): "
            f"{type(error).__name__}: {error}. Check the network (or HF_ENDPOINT). {fix}"
        ) from error
    role = user.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubAccessError(
            f"--push_to_hub: the Hugging Face Hub token of {user.get('name')!r} is read-only; "
            f"create one with write access (https://huggingface.co/settings/tokens). {fix}"
        )
    return str(user.get("name"))


def _exclude_flags() -> str:
    return " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in UPLOAD_IGNORE_PATTERNS)


def retry_upload_command(repo_id: str, output_dir: str | Path, revision: str | None = None) -> str:
    """The `hf upload` command that uploads what `Trainer.push_to_hub` would have uploaded."""
    command = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(output_dir))} . "
    command += _exclude_flags()
    if revision:
        command += f" --revision {shlex.quote(revision)}"
    return command


def upload_failure_message(
    error: BaseException, repo_id: str, output_dir: str | Path, revision: str | None = None
) -> str:
    """Say what failed, that nothing local was lost, and how to retry."""
    output_dir = Path(output_dir)
    kept = sorted(
        path.name
        for path in output_dir.iterdir()
        if path.is_file() and not path.name.startswith("_")
    )
    return (
        f"Uploading {output_dir} to the Hugging Face Hub repository {repo_id} failed "
        f"({type(error).__name__}: {error}). Nothing was lost: {', '.join(kept)} are in "
        f"{output_dir}. Retry the upload with:\n\n    "
        + retry_upload_command(repo_id, output_dir, revision)
    )
