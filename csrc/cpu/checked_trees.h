// A record of the CPU tree tables whose every leaf path has been checked, so the kernels check
// only each call's targets against them instead of walking every target's path twice.
#pragma once

#include <ATen/core/Tensor.h>

namespace hsoftmax {

// Whether every leaf path of these tables passes check_target_paths with `max_path_rows`. The
// first call with a set of tables checks all V paths (O(V * depth), once); later calls answer
// from a record keyed on the four tensors themselves (held by weak references, so a freed
// tensor's address is never taken for a new one) and their version counters, so any in-place
// change to a table, through PyTorch, makes the next call check the paths again. Writes that
// bypass the version counter (through `.data`, a NumPy view or a raw pointer) are not seen, as
// autograd does not see them either; Tree's tables are internal and never written after they are
// built. Tables that are inference tensors (no version counter) are never recorded: false, and
// the caller checks each target's path as before.
bool tree_paths_checked(const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                        const at::Tensor& path_node, const at::Tensor& path_choice,
                        int64_t max_path_rows);

}  // namespace hsoftmax
