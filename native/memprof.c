/* Statistical profiler: placeholder until the profiler lands. */
#include "memprof.h"

volatile int ml_memprof_enabled;
volatile int ml_memprof_track_frees;

void ml_memprof_on_sample(void *ptr, size_t size, int64_t n_samples, int domain)
{
    (void)ptr; (void)size; (void)n_samples; (void)domain;
}

void ml_memprof_on_free(void *ptr) { (void)ptr; }
