"""The VLM task registry: the names vlm.config validates, one uniform interface per task module."""
import inspect

from eval.tasks import VLM_REPORT_COLUMNS, VLM_TASKS
from vlm.config import VLM_TASK_NAMES

UNIFORM_RUN = ["model", "data", "out_dir", "limit", "batch_size", "options"]


def test_registry_names_equal_the_configs():
    """vlm.config (layer 0, cannot import eval) validates vlm_tasks against its own tuple."""
    assert tuple(VLM_TASKS) == tuple(VLM_TASK_NAMES)


def test_every_task_module_has_the_uniform_interface():
    for name, module in VLM_TASKS.items():
        assert module.TASK == name
        params = inspect.signature(module.run).parameters
        assert list(params) == UNIFORM_RUN, (name, list(params))
        assert [params[p].default for p in ("limit", "batch_size", "options")] == [None, 16, None], name
        assert list(inspect.signature(module.load).parameters) == ["src", "limit"], name
        assert isinstance(module.HEADLINE, list) and isinstance(module.REPORT_COLUMNS, list), name


def test_report_columns_keep_the_demo_tables_order():
    assert VLM_REPORT_COLUMNS == [
        "caption/CIDEr", "caption/BLEU_4", "caption/METEOR", "caption/ROUGE_L", "chair/chair_i", "chair/chair_s",
        "chair/recall", "pope/f1_avg", "pope/accuracy_avg", "pope/random/f1", "pope/popular/f1",
        "pope/adversarial/f1", "refcoco/acc", "refcoco/unparseable_rate", "vsr/accuracy"]
