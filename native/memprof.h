/* Interface between the sampler (sampler.c) and the statistical profiler
 * (memprof.c).  The sampler calls these from its hooks: they must not call
 * the C API, allocate through PyMem, or raise. */
#ifndef MEMPROF_LIMITS_MEMPROF_H
#define MEMPROF_LIMITS_MEMPROF_H
#include <stddef.h>
#include <stdint.h>

#define ML_DOMAIN_RAW 0
#define ML_DOMAIN_MEM 1
#define ML_DOMAIN_OBJ 2

/* Nonzero while the profiler runs.  Written with the GIL by memprof.c's
 * start/stop; read by hooks (a stale read only drops or adds one sample). */
extern volatile int ml_memprof_enabled;
/* Nonzero while sampled blocks are tracked (ml_set_free_hooks installed). */
extern volatile int ml_memprof_track_frees;

/* `n_samples` samples fell into the block `ptr` of `size` bytes just
 * allocated by the current thread in `domain` (GIL held unless RAW). */
void ml_memprof_on_sample(void *ptr, size_t size, int64_t n_samples, int domain);
/* `ptr` is about to be freed (or reallocated). */
void ml_memprof_on_free(void *ptr);
#endif
