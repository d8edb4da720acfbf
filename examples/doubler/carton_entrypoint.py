"""The doubler: the smallest model Carton's docs show. Doubles tensor ``x`` into ``out``."""

from typing import Any


class Model:
    def __init__(self, an_example_custom_option: bool) -> None:
        self.an_example_custom_option = an_example_custom_option

    def infer_with_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"out": tensors["x"] * 2}


def get_model(an_example_custom_option: bool) -> Model:
    """The entrypoint: custom options arrive as keyword arguments, without `model.`."""
    if not isinstance(an_example_custom_option, bool):
        raise TypeError("an_example_custom_option must be a bool")
    return Model(an_example_custom_option)
