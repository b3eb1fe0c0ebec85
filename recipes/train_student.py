"""Train any transformers image classifier on a distilled dataset, then score it on the real test split:
`python recipes/train_student.py --config recipes/configs/fashion_mnist.yaml --student_model <config.json, folder or
Hub id> --distilled outputs/fashion_mnist/pipeline`.

Settings are the run's (`--config` takes the same YAML as `recipes/distill.py`, or a finished run's `config.json`:
eval_steps, eval_batch_size, eval_lr, eval_augment, seed, dataset, ...) plus those of
`hf_d3.student_training.StudentTrainingConfig`; any of them can be given on the command line. Writes the model and
`metrics.json` to `student_output_dir` (default `<output_dir>/student`). Runs under `accelerate launch` too.
"""

from hf_d3.cli import run_recipe
from hf_d3.config_parser import parse_recipe_args
from hf_d3.student_training import StudentTrainingConfig, run_student_training


def main():
    config, student = parse_recipe_args(None, StudentTrainingConfig)
    result = run_student_training(config, student)
    if result is not None:
        print(f"test accuracy {100 * result.accuracy:.2f} % on {result.num_test_examples} real test images: "
              f"{result.model_type} ({result.num_parameters:,} parameters), {result.steps} steps on "
              f"{result.distilled}; saved to {result.output_dir}")


if __name__ == "__main__":
    run_recipe(main)
