/*
 * memload: a memory workload the host drives, for the memory policy bench.
 *
 *   memload MIB:SECONDS [MIB:SECONDS ...]
 *
 * Each phase moves the memory it holds in a straight line to MIB MiB over SECONDS
 * (0 seconds: at once), so the host writes any pattern as phases: a ramp and hold
 * is "256:10 256:30 0:0", a spike "16:20 200:0 200:5 16:0", a slow leak
 * "8:0 128:300". Memory is held in 1 MiB blocks, each its own mapping, filled when
 * taken and unmapped when given back, so the guest's kernel gets it back at once.
 *
 * While it runs it works: it rewrites one word in each held page, round robin,
 * and counts the pages rewritten (its "ops"). A guest slowed down by the host
 * (less memory, throttled) does fewer ops per second. Every second it writes
 * /run/memload.json: state (running, done, error), phase, held MiB, ops, ops/s
 * over the last second and over the whole run. A block it cannot get (the guest
 * is out of memory) is tried again later: the phase waits, counted as stalled.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define BLOCK (1u << 20)
#define PAGES_PER_BLOCK (BLOCK / PAGE)
#define RESULT "/run/memload.json"
#define MAX_PHASES 256
#define MAX_BLOCKS (64u * 1024u) /* 64 GiB */

struct phase { double mib, seconds; };

static unsigned char *blocks[MAX_BLOCKS];
static unsigned held;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static void report(const char *state, int phase, int phases, unsigned long long ops, double ops_s,
                   double run_s, double stalled_s, const char *error) {
    FILE *f = fopen(RESULT ".tmp", "w");
    if (!f) return;
    fprintf(f, "{\"state\":\"%s\",\"phase\":%d,\"phases\":%d,\"held_mib\":%u,\"ops\":%llu,"
               "\"ops_per_s\":%.0f,\"mean_ops_per_s\":%.0f,\"seconds\":%.2f,\"stalled_s\":%.2f%s%s%s}\n",
            state, phase, phases, held, ops, ops_s, run_s > 0 ? ops / run_s : 0.0, run_s, stalled_s,
            error ? ",\"error\":\"" : "", error ? error : "", error ? "\"" : "");
    fclose(f);
    rename(RESULT ".tmp", RESULT);
}

/* Take blocks up to want; 0 if one could not be had (out of memory). */
static int grow(unsigned want) {
    while (held < want) {
        unsigned char *b = mmap(NULL, BLOCK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b == MAP_FAILED) return 0;
        for (unsigned p = 0; p < PAGES_PER_BLOCK; p++) /* a real page each, not the zero page */
            memset(b + (size_t)p * PAGE, (int)((held + p) & 0x7f) | 1, 64);
        blocks[held++] = b;
    }
    return 1;
}

static void shrink(unsigned want) {
    while (held > want) munmap(blocks[--held], BLOCK);
}

int main(int argc, char **argv) {
    struct phase phases[MAX_PHASES];
    int n = 0;
    for (int i = 1; i < argc; i++) {
        double mib, s;
        char extra;
        if (n == MAX_PHASES || sscanf(argv[i], "%lf:%lf%c", &mib, &s, &extra) != 2 || mib < 0 || s < 0 ||
            mib > (double)MAX_BLOCKS) {
            fprintf(stderr, "usage: memload MIB:SECONDS [MIB:SECONDS ...] (at most %d phases)\n", MAX_PHASES);
            report("error", 0, 0, 0, 0, 0, 0, "bad phase: use MIB:SECONDS, e.g. 256:10");
            return 2;
        }
        phases[n].mib = mib;
        phases[n].seconds = s;
        n++;
    }
    if (n == 0) {
        fprintf(stderr, "usage: memload MIB:SECONDS [MIB:SECONDS ...]\n");
        return 2;
    }
    double start = now(), phase_start = start, last_report = start, stalled = 0;
    unsigned long long ops = 0, ops_at_report = 0;
    double from = 0;
    size_t cursor = 0; /* the next page to rewrite, over all held pages */
    int i = 0;
    report("running", 0, n, 0, 0, 0, 0, NULL);
    while (i < n) {
        double t = now();
        double span = phases[i].seconds;
        double frac = span > 0 ? (t - phase_start) / span : 1.0;
        if (frac > 1.0) frac = 1.0;
        unsigned want = (unsigned)(from + (phases[i].mib - from) * frac + 0.5);
        if (want < held) shrink(want);
        int ok = grow(want);
        if (!ok) {
            stalled += 0.01;
            phase_start += 0.01; /* the phase waits for the memory */
            usleep(10000);
        }
        /* ~10 ms of work: rewrite a word in each held page in turn */
        size_t pages = (size_t)held * PAGES_PER_BLOCK;
        double until = now() + 0.01;
        while (pages && now() < until) {
            for (int k = 0; k < 256; k++) {
                size_t p = cursor++ % pages;
                unsigned char *page = blocks[p / PAGES_PER_BLOCK] + (p % PAGES_PER_BLOCK) * PAGE;
                ((volatile uint64_t *)page)[(ops >> 3) & 511] = ops;
                ops++;
            }
        }
        if (!pages) usleep(10000);
        if (ok && frac >= 1.0) {
            from = phases[i].mib;
            i++;
            phase_start = now();
        }
        t = now();
        if (t - last_report >= 1.0) {
            report("running", i, n, ops, (ops - ops_at_report) / (t - last_report), t - start, stalled, NULL);
            ops_at_report = ops;
            last_report = t;
        }
    }
    double t = now();
    report("done", n, n, ops, (ops - ops_at_report) / (t - last_report > 0 ? t - last_report : 1), t - start, stalled, NULL);
    shrink(0);
    return 0;
}
