"""Tuners tab: the installed tuners with their metadata; load into use, rename, delete, import, fetch, export."""
from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr

from scedit_ui.conditions import CONDITION_KINDS
from scedit_ui.tuner_library import OFFICIAL_REPO, TunerEntry
from scedit_ui.ui.handlers import user_errors
from scedit_ui.ui.state import AppState
from tuners.validation import UserInputError

TABLE_COLUMNS = ["name", "kind", "base", "condition", "trigger word", "parameters", "size", "fits loaded base", "where"]


@dataclass
class TunersTab:
    """What other tabs wire to."""

    selector: gr.Dropdown
    load_button: gr.Button
    unload_button: gr.Button
    status: gr.Markdown


# -- plain functions -----------------------------------------------------------------------------


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 10_000 else f"{count:,}"


def table_row(entry: TunerEntry, state: AppState) -> list[str]:
    where = "shipped" if entry.shipped else "library"
    if entry.metadata is None:
        return [entry.name, "unreadable", "", "", "", "", f"{entry.size_bytes / 1e6:.1f} MB", "no", where]
    meta = entry.metadata
    layout = state.manager.editor.layout if state.manager.editor is not None else None
    return [
        entry.name, meta.kind, meta.base_architecture, meta.condition_type or "", meta.trigger_word or "",
        _millions(entry.num_parameters), f"{entry.size_bytes / 1e6:.1f} MB", "yes" if layout and entry.fits(layout) else "no", where,
    ]


def tuner_table(state: AppState) -> list[list[str]]:
    """One row per installed tuner: name, kind, base, condition, trigger word, parameters, size, fit, where."""
    return [table_row(entry, state) for entry in state.library.entries()]


def tuner_details(state: AppState, name: str | None) -> dict:
    """Everything a tuner file says about itself, plus where it is."""
    if not name:
        return {}
    entry = state.library.entry(name)
    details = {"name": entry.name, "file": str(entry.path), "size_bytes": entry.size_bytes, "parameters": entry.num_parameters}
    if entry.error:
        details["error"] = entry.error
    if entry.metadata is not None:
        details["metadata"] = json.loads(json.dumps(asdict(entry.metadata)))
    return details


def check_fits(state: AppState, name: str) -> TunerEntry:
    """The entry of `name`, after loading it for the current base (a tuner for other skips is refused here)."""
    entry = state.library.entry(name)
    if entry.metadata is None:
        raise UserInputError(f"{name} cannot be used: {entry.error}")
    state.manager.tuner(entry.path)
    return entry


def with_tuner(entry: TunerEntry, sc_slots: list[str | None], kinds: list[str]) -> tuple[list[str | None], list[str], str | None]:
    """Slots and condition types after putting `entry` into use: SC in the first free Generate slot, CSC in its condition row."""
    if entry.kind == "sc":
        if entry.name in sc_slots:
            return sc_slots, kinds, None
        if None not in sc_slots and "" not in sc_slots:
            raise UserInputError(f"all {len(sc_slots)} SC tuner slots of the Generate tab are taken; unload one first")
        free = next(i for i, name in enumerate(sc_slots) if not name)
        return [entry.name if i == free else name for i, name in enumerate(sc_slots)], kinds, None
    condition = entry.metadata.condition_type
    if condition not in CONDITION_KINDS:
        raise UserInputError(f"{entry.name} is for condition type {condition!r}, which this app cannot extract; choose a row in the Control tab by hand")
    return sc_slots, sorted({*kinds, condition}, key=list(CONDITION_KINDS).index), condition


# -- the tab -------------------------------------------------------------------------------------


def fetch_tuner(state: AppState, repo_id: str, subfolder: str, name: str, condition_type: str) -> Path:
    """Download an official tuner into the library, converted for the loaded base (or the one its folder names)."""
    manager = state.manager
    return state.library.fetch(
        subfolder or "", (repo_id or "").strip() or OFFICIAL_REPO, manager.editor.layout if manager.editor else None,
        manager.family if manager.family in ("sd15", "sd21", "sdxl") else None, (name or "").strip() or None, condition_type or None,
    )


def export_official_zip(state: AppState, name: str) -> Path:
    """Tuner `name` as SCEPTER lays it out (0_SwiftSCETuning/...), zipped for download."""
    folder = Path(tempfile.mkdtemp(prefix="scedit-export-"))
    exported = state.library.export_official(name, folder / name)
    archive = folder / f"{name}-scepter.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:  # weights do not compress; storing is fast
        for file in sorted(exported.rglob("*")):
            if file.is_file():
                out.write(file, file.relative_to(exported).as_posix())
    return archive


def build(state: AppState, library_version: gr.State) -> TunersTab:
    table = gr.Dataframe(tuner_table(state), headers=TABLE_COLUMNS, interactive=False, label="Installed tuners", wrap=True, elem_id="tuner-table")
    with gr.Row():
        with gr.Column(scale=2):
            selector = gr.Dropdown(state.library.names(), value=None, label="Tuner", allow_custom_value=True, elem_id="tuner-selector")
            with gr.Row():
                load_button = gr.Button("Load into Generate / Control", variant="primary", size="sm", elem_id="tuner-load")
                unload_button = gr.Button("Unload", size="sm", elem_id="tuner-unload")
                export_button = gr.Button("Export", size="sm")
                export_official_button = gr.Button("Export for SCEPTER", size="sm")
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=3)
                rename_button = gr.Button("Rename", size="sm", scale=1)
            delete_button = gr.Button("Delete", variant="stop", size="sm")
            status = gr.Markdown(elem_id="tuner-status")
            exported = gr.File(label="Exported file", interactive=False, height=90)
        with gr.Column(scale=2):
            details = gr.JSON(label="Metadata")
    with gr.Accordion("Import", open=False):
        gr.Markdown(
            "A `.safetensors` tuner of this app, or an official SCEdit checkpoint (`pytorch_model.bin` or "
            "`adapter_model.safetensors`, with its `configuration.json`) for the loaded base model."
        )
        with gr.Row():
            files = gr.File(label="Files", file_count="multiple", file_types=[".safetensors", ".bin", ".json"], type="filepath")
            with gr.Column():
                import_name = gr.Textbox(label="Name (default: the file name)")
                import_condition = gr.Dropdown(["", *CONDITION_KINDS], value="", label="Condition type (official CSC checkpoints)")
                import_button = gr.Button("Import", variant="primary")
    with gr.Accordion("Fetch an official tuner from the Hugging Face Hub", open=False):
        gr.Markdown(
            "A folder of the SCEdit release, e.g. `controllable_model/SD2.1/canny_control` or "
            "`tuners_model/SD1.5/Caricature`; it is converted for the loaded base model. Offline, the message says "
            "what to download and where to put it."
        )
        with gr.Row():
            hub_repo = gr.Textbox(OFFICIAL_REPO, label="Hub id")
            hub_folder = gr.Textbox(label="Sub-folder", placeholder="controllable_model/SD2.1/canny_control")
            hub_name = gr.Textbox(label="Name (default: from the folder)")
            hub_condition = gr.Dropdown(["", *CONDITION_KINDS], value="", label="Condition type (default: from the folder)")
        fetch_button = gr.Button("Fetch", variant="primary")

    def changed(version: int) -> int:
        return version + 1

    def list_tuners() -> tuple[list[list[str]], gr.Dropdown]:
        """The table of installed tuners (and the names for the selector)."""
        return tuner_table(state), gr.Dropdown(choices=state.library.names())

    @user_errors
    def show(name: str | None) -> dict:
        """Metadata of one tuner."""
        return tuner_details(state, name)

    @user_errors
    def rename(name: str | None, new_name: str) -> tuple[str, str]:
        """Rename a library tuner (the new name is sanitised; shipped tuners are read-only)."""
        if not name:
            raise UserInputError("choose a tuner to rename")
        path = state.library.rename(name, new_name or "")
        return path.stem, f"renamed {name} to {path.stem}"

    @user_errors
    def delete(name: str | None) -> tuple[None, str]:
        """Delete a library tuner (shipped tuners are read-only)."""
        if not name:
            raise UserInputError("choose a tuner to delete")
        state.library.delete(name)
        return None, f"deleted {name}"

    @user_errors
    def import_tuner(files: list[str] | None, name: str, condition_type: str) -> tuple[str, str]:
        """Import a tuner file or an official SCEdit checkpoint (converted for the loaded base model)."""
        manager = state.manager
        path = state.library.import_files(
            files or [], name=(name or "").strip() or None, layout=manager.editor.layout if manager.editor else None,
            base_architecture=manager.family or "unknown", condition_type=condition_type or None,
        )
        return path.stem, f"imported {path.stem}"

    @user_errors
    def fetch(repo_id: str, subfolder: str, name: str, condition_type: str) -> tuple[str, str]:
        """Download an official SCEdit tuner by hub id and sub-folder into the library."""
        path = fetch_tuner(state, repo_id, subfolder, name, condition_type)
        return path.stem, f"fetched {path.stem}"

    @user_errors
    def export_for_scepter(name: str | None) -> str:
        """The tuner in SCEPTER's layout (0_SwiftSCETuning/ with its configuration and weights), zipped."""
        if not name:
            raise UserInputError("choose a tuner to export")
        return str(export_official_zip(state, name))

    @user_errors
    def export(name: str | None) -> str:
        """The tuner file, for download."""
        if not name:
            raise UserInputError("choose a tuner to export")
        return str(state.library.export(name).resolve())

    selector.change(show, selector, details, api_name="tuner_details", queue=False)
    for event in (
        rename_button.click(rename, [selector, new_name], [selector, status], api_name="rename_tuner"),
        delete_button.click(delete, selector, [selector, status], api_name="delete_tuner"),
        import_button.click(import_tuner, [files, import_name, import_condition], [selector, status], api_name="import_tuner"),
        fetch_button.click(fetch, [hub_repo, hub_folder, hub_name, hub_condition], [selector, status], api_name="fetch_tuner"),
    ):
        # Queued (the default): only then does the State's change event fire in the browser.
        event.success(changed, library_version, library_version, api_name="library_changed", api_visibility="private")
    export_button.click(export, selector, exported, api_name="export_tuner")
    export_official_button.click(export_for_scepter, selector, exported, api_name="export_tuner_official")
    library_version.change(list_tuners, None, [table, selector], api_name="list_tuners", queue=False)
    return TunersTab(selector, load_button, unload_button, status)
