// The tree's leaf paths as the path_log_prob kernels read them, and the one walk along a path
// that the CPU and CUDA kernels (forward and backward) share.
//
// Leaf y's path is the entries s in [leaf_path_ptr[y], leaf_path_ptr[y + 1]) in root-first order:
// internal node path_node[s] owns weight rows node_row_ptr[node] .. node_row_ptr[node + 1] (one per
// child after the first) and the path takes its child path_choice[s]. An example's gradient
// coefficients are stored in path order, one entry per weight row, so entry e of an example is the
// e-th row met on this walk.
#pragma once

#include <cstdint>

#include "hsoftmax_math.h"

namespace hsoftmax {

struct PathTree {
  const int32_t* node_row_ptr;
  const int64_t* leaf_path_ptr;
  const int32_t* path_node;
  const int32_t* path_choice;
  int64_t num_leaves;
};

// The kernels never index with a target outside [0, V): the CPU checks first and raises; the CUDA
// kernels (which cannot raise) write NaN and zero coefficients for it instead.
HSM_HOST_DEVICE bool valid_target(const PathTree& tree, int64_t y) {
  return y >= 0 && y < tree.num_leaves;
}

// Calls fn(s, r0, n, e0) for every node on leaf y's path, root first: s its path entry, r0 its
// first weight row, n its number of rows, e0 the coefficient entry of its first row.
template <typename F>
HSM_HOST_DEVICE void for_each_path_node(const PathTree& tree, int64_t y, F&& fn) {
  int64_t e0 = 0;
  for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1]; ++s) {
    const int32_t node = tree.path_node[s];
    const int64_t r0 = tree.node_row_ptr[node];
    const int n = tree.node_row_ptr[node + 1] - static_cast<int32_t>(r0);
    fn(s, r0, n, e0);
    e0 += n;
  }
}

// Calls fn(row, e) for every weight row on leaf y's path, e its coefficient entry.
template <typename F>
HSM_HOST_DEVICE void for_each_path_row(const PathTree& tree, int64_t y, F&& fn) {
  for_each_path_node(tree, y, [&](int64_t, int64_t r0, int n, int64_t e0) {
    for (int k = 0; k < n; ++k) fn(r0 + k, e0 + k);
  });
}

}  // namespace hsoftmax
