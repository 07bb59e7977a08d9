"""Upload a saved model folder to the Hugging Face Hub. The token is used in memory only."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HereticError, first_line
from ..search.records import RECORD_FILE
from ..ui import console


def resolve_token(interactive: bool) -> str:
    """HF_TOKEN, else the user's stored login, else asked without echo. Never written anywhere by us."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token and interactive:
        import questionary

        token = questionary.password("Hugging Face access token (write permission):").ask()
    if not token:
        raise HereticError("No Hugging Face token: set HF_TOKEN, run `hf auth login`, or run interactively to enter one.")
    return token


def upload_folder(folder: Path, repo_id: str | None, private: bool, interactive: bool, include_record: bool = True) -> str:
    """Upload a saved folder in one commit; without `include_record`, heretic.json stays local and the card
    loses its section on reproducing (which refers to it)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not repo_id and interactive:
        import questionary

        repo_id = questionary.text("Repository to upload to (user/name):").ask()
    if not repo_id or repo_id.count("/") != 1:
        raise HereticError("Name the repository to upload to as user/name with --upload-repo.")
    token = resolve_token(interactive)
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
        for name, content in upload_files(folder, include_record).items()
    ]
    try:
        with console.status(f"Uploading {folder} to {repo_id}..."):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.create_commit(
                repo_id=repo_id, repo_type="model", operations=operations, commit_message="Upload model abliterated with Heretic"
            )
    except Exception as error:  # noqa: BLE001 - offline, auth, HTTP errors: all end the same way
        raise HereticError(
            f"Uploading to the Hugging Face Hub failed ({first_line(error, 200, secret=token)}); the model stays saved in {folder}."
        ) from None
    url = f"https://huggingface.co/{repo_id}"
    console.print(f"Uploaded to [bold]{url}[/] ({'private' if private else 'public'})")
    return url


def upload_files(folder: Path, include_record: bool) -> dict[str, str | bytes]:
    """Path in the repository -> local file path (or, for an edited card, its bytes)."""
    files: dict[str, str | bytes] = {
        path.relative_to(folder).as_posix(): str(path) for path in sorted(folder.rglob("*")) if path.is_file()
    }
    if not include_record:
        files.pop(RECORD_FILE, None)
        if "README.md" in files:
            files["README.md"] = without_section((folder / "README.md").read_text(encoding="utf-8"), "## Reproduce").encode()
    return files


def without_section(markdown: str, heading: str) -> str:
    """`markdown` less the section that starts with the line `heading` (up to the next heading of its level)."""
    lines, kept, skipping = markdown.splitlines(keepends=True), [], False
    level = heading.split()[0] + " "
    for line in lines:
        if line.rstrip() == heading:
            skipping = True
            continue
        if skipping and line.startswith(level):
            skipping = False
        if not skipping:
            kept.append(line)
    return "".join(kept)
