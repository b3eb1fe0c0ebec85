import diffusers

from .pipeline_d3 import D3Pipeline, D3PipelineOutput

# `DiffusionPipeline.from_pretrained` looks the `_class_name` of a folder's model_index.json up among the diffusers
# module's attributes: naming D3Pipeline there is what lets a saved D3 folder load through it once hf_d3 is imported.
diffusers.D3Pipeline = D3Pipeline

__all__ = ["D3Pipeline", "D3PipelineOutput"]
