"""MONAI Deploy application: enhance the deltaM of BIDS-ASL series with the exported bundle (model.ts).

Run locally:   python deploy/app.py -i INPUT -o OUTPUT -m asl_bundle/models/model.ts
or with HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH set. INPUT is a BIDS(-like) folder
or one ``*_asl.nii.gz`` (its ``*_aslcontext.tsv`` beside it). ``ASL_NUM_PAIRS`` picks how many pairs to use.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# the bundle's own package: a copy beside the app (as packaged), else the repository's bundle folder
for _candidate in (_HERE, _HERE.parent / "asl_bundle"):
    if (_candidate / "asl_enhance" / "__init__.py").is_file():
        sys.path.insert(0, str(_candidate))
        break
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from asl_enhance.version import __version__ as APP_VERSION  # noqa: E402
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application  # noqa: E402
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames  # noqa: E402
from operators import (  # noqa: E402
    ASLBundleInferenceOperator,
    ASLNiftiWriterOperator,
    ASLSeriesLoaderOperator,
    num_pairs_from_env,
)


class ASLEnhanceApp(Application):
    """Series finder -> bundle inference (TorchScript, bundle pre/postprocessing) -> float32 NIfTI writer."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        loader = ASLSeriesLoaderOperator(
            self, CountCondition(self, 1), input_path=Path(app_context.input_path), name="asl_loader_op"
        )
        infer = ASLBundleInferenceOperator(
            self,
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            num_pairs=num_pairs_from_env(),
            name="asl_bundle_inference_op",
        )
        writer = ASLNiftiWriterOperator(
            self, output_path=Path(app_context.output_path), version=APP_VERSION, name="asl_writer_op"
        )
        self.add_flow(loader, infer, {("series", "series")})
        self.add_flow(infer, writer, {("pred", "pred")})
        logging.info("composed %s", type(self).__name__)


def main() -> None:
    ASLEnhanceApp().run()


if __name__ == "__main__":
    main()
