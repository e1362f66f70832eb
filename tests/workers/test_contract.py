"""The contract's kinds agree with the node code that produces them."""

from typing import get_args

from workers import contract
from workers.node.reports import STATES_ON_WIRE
from workers.qemu import VmState


def test_every_driver_state_goes_on_the_wire_under_its_own_name():
    assert set(STATES_ON_WIRE) == set(VmState)
    assert {state.value: node_state for state, (node_state, _) in STATES_ON_WIRE.items()} == {
        state.value: state.value for state in VmState
    }
    assert set(get_args(contract.NodeVmState)) == {state.value for state in VmState}


def test_a_node_reports_every_control_state_the_contract_names():
    assert {control_state for _, control_state in STATES_ON_WIRE.values()} == set(
        get_args(contract.ControlVmState)
    )
