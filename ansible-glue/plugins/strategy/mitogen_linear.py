# arbor: Mitogen's strategy name `mitogen_linear`, for an ansible.cfg that
# still names it (`strategy = mitogen_linear`). arbor needs no strategy of its
# own: this is Ansible's own `linear`, under Mitogen's name. Put this directory
# on `strategy_plugins` in place of Mitogen's.
from __future__ import annotations

from ansible.plugins.strategy.linear import StrategyModule as _Builtin
from ansible.utils.display import Display

DOCUMENTATION = """{name: mitogen_linear, author: arbor, short_description: "Ansible's own linear strategy, under Mitogen's name (arbor)",
  description: ["arbor works through connection plugins under Ansible's own strategies; this name lets an ansible.cfg written for Mitogen run unchanged."]}"""


class StrategyModule(_Builtin):
    def __init__(self, *args, **kwargs):
        super(StrategyModule, self).__init__(*args, **kwargs)
        Display().vvv("arbor: strategy mitogen_linear is Ansible's own linear")
