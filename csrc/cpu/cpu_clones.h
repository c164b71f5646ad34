// Function multi-versioning for the CPU hot loops: each marked function is compiled twice and
// the copy to run is picked at load time, AVX2+FMA+BMI (x86-64-v3) where the CPU has them,
// baseline x86-64 otherwise. "arch=x86-64-v3" (GCC >= 12) is resolved by CPU *features*;
// "arch=haswell" would be resolved by CPU *model*, false on later Intel/AMD cores and most VMs.
// Results are deterministic on a given machine; FMA may change the last bits between machines.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && \
    !defined(HSM_NO_CLONES)
#define HSM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HSM_CPU_CLONES
#endif
