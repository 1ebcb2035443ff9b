"""A1111 / Forge: command-line flags of this extension (the webui calls preload(parser) at start)."""


def preload(parser):
    parser.add_argument(
        "--dice-refiners-dir", type=str, default=None,
        help="folder of DICE refiner .safetensors files for cfg-distill (default: models/dice_refiners). "
             "Point ComfyUI's 'dice_refiners' model folder (extra_model_paths.yaml) at the same place "
             "to share one set of refiners between both.")
