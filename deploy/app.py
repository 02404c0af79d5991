"""MONAI Deploy application: enhance the deltaM of BIDS-ASL series with the exported bundle (model.ts).

Run locally:   PYTHONPATH=asl_bundle python deploy/app.py -i INPUT -o OUTPUT -m asl_bundle/models/model.ts
or with HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH set. INPUT is a BIDS(-like) folder
or one ``*_asl.nii.gz`` (its ``*_aslcontext.tsv`` beside it). ``ASL_NUM_PAIRS`` picks how many pairs to use.
A series that cannot be read, enhanced or written is named in one line and the others go on; the app
then exits with status 1 (as ``monai.bundle run`` does). The bundle's package ``asl_enhance`` must be
importable: packaged, it is copied beside this file (deploy/README.md); in the repository,
``PYTHONPATH=asl_bundle`` (or ``pip install -e .``) provides it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from asl_enhance.failures import exit_status
from asl_enhance.version import __version__ as APP_VERSION
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames
from operators import (
    ASLBundleInferenceOperator,
    ASLNiftiWriterOperator,
    ASLSeriesLoaderOperator,
    num_pairs_from_env,
)


class ASLEnhanceApp(Application):
    """Series finder -> bundle inference (TorchScript, bundle pre/postprocessing) -> float32 NIfTI writer.

    The operators add a line per failed series to ``failures``; :meth:`run` exits with status 1 after
    the graph has run when there is any, so a batch with a bad series never reads as a success."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.failures: list[str] = []

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        loader = ASLSeriesLoaderOperator(
            self,
            CountCondition(self, 1),
            input_path=Path(app_context.input_path),
            failures=self.failures,
            name="asl_loader_op",
        )
        infer = ASLBundleInferenceOperator(
            self,
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            num_pairs=num_pairs_from_env(),
            failures=self.failures,
            name="asl_bundle_inference_op",
        )
        writer = ASLNiftiWriterOperator(
            self,
            output_path=Path(app_context.output_path),
            version=APP_VERSION,
            failures=self.failures,
            name="asl_writer_op",
        )
        self.add_flow(loader, infer, {("series", "series")})
        self.add_flow(infer, writer, {("pred", "pred")})
        logging.info("composed %s", type(self).__name__)

    def run(self, *args: Any, **kwargs: Any) -> None:
        """Run the graph, then report the failed series and exit with status 1 if there were any."""
        super().run(*args, **kwargs)
        if self.failures:
            lines = [f"{len(self.failures)} series failed:"] + [f"  FAILED {line}" for line in self.failures]
            print("\n".join(lines), file=sys.stderr, flush=True)
            raise SystemExit(exit_status(self.failures))


def main() -> None:
    ASLEnhanceApp().run()


if __name__ == "__main__":
    main()
