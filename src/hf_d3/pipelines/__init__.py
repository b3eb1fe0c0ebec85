from .pipeline_d3 import D3Pipeline, D3PipelineOutput

__all__ = ["D3Pipeline", "D3PipelineOutput"]
