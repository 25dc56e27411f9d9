"""compiler/errors.py: the one line an error message keeps."""
from fxforge.compiler.errors import first_line


def test_a_first_line_announcing_what_follows_keeps_the_next_line():
    """TVM's LLVM verifier says "... failed with the following errors:" and the cause on the next line: the
    BackendError kept the announcement alone and named no cause (a bool ``count_nonzero``)."""
    llvm = RuntimeError("LLVM module verification failed with the following errors: \n"
                        "Invalid operand types for FCmp instruction\n  %34 = fcmp one i1 %33, false\n")
    assert first_line(llvm) == ("LLVM module verification failed with the following errors: "
                                "Invalid operand types for FCmp instruction")
    assert first_line(ValueError("\n  shape mismatch\n  at node x\n")) == "shape mismatch"
    assert first_line(KeyError()) == "KeyError"
