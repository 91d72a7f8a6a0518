/*
 * memcheck: the guest's memory-integrity workload.
 *
 * The idea is QEMU's migration test guest: give every page a content that
 * can be recomputed from its index, so any page that a snapshot, clone or
 * migration lost or mixed up shows as a mismatch.
 *
 *   memcheck daemon MIB SEED   fill MIB MiB, then wait; SIGUSR1 verifies
 *                              every page and writes /run/memcheck.json
 *
 *   memcheck dirty MIB RATE    rewrite pages of a MIB MiB region at RATE MB/s
 *                              (10^6 bytes) until killed: the "guest writing
 *                              20 MB/s" load for migration benchmarks;
 *                              progress in /run/memdirty.json
 *
 * The agent starts the daemon ("memcheck-fill") and sends SIGUSR1
 * ("memcheck-verify"); "memcheck-dirty MIB RATE" / "memcheck-dirty-stop"
 * run the writer. Results are one JSON object per line.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define RESULT "/run/memcheck.json"

static volatile sig_atomic_t verify_requested;

static void on_usr1(int sig) { (void)sig; verify_requested = 1; }

static uint64_t word_for(uint64_t seed, uint64_t page, uint64_t word) {
    uint64_t x = seed ^ (page * 0x9E3779B97F4A7C15ull) ^ (word << 32);
    x ^= x >> 31;
    return x * 0xBF58476D1CE4E5B9ull;
}

static void write_result(const char *json) {
    FILE *f = fopen(RESULT ".tmp", "w");
    if (!f) return;
    fputs(json, f);
    fclose(f);
    rename(RESULT ".tmp", RESULT);
}

/* Rewrite whole pages round-robin, RATE MB/s in 10 ms steps, until killed. */
static int dirty(uint64_t mib, uint64_t rate_mb) {
    uint64_t pages = mib * 1024 * 1024 / PAGE;
    unsigned char *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED || pages == 0) return 1;
    double per_tick = rate_mb * 1e6 / 100.0 / PAGE; /* pages per 10 ms */
    double owed = 0;
    uint64_t next = 0, written = 0, ticks = 0;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    for (;;) {
        owed += per_tick;
        while (owed >= 1.0) {
            memset(mem + next * PAGE, (int)(written & 0xff) | 1, PAGE);
            next = (next + 1) % pages;
            written++;
            owed -= 1.0;
        }
        if (++ticks % 100 == 0) {
            FILE *f = fopen("/run/memdirty.json.tmp", "w");
            if (f) {
                fprintf(f, "{\"state\":\"dirtying\",\"rate_mb_s\":%llu,\"pages_written\":%llu}\n",
                        (unsigned long long)rate_mb, (unsigned long long)written);
                fclose(f);
                rename("/run/memdirty.json.tmp", "/run/memdirty.json");
            }
        }
        t.tv_nsec += 10000000;
        if (t.tv_nsec >= 1000000000) { t.tv_nsec -= 1000000000; t.tv_sec++; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
    }
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "dirty") == 0)
        return dirty(strtoull(argv[2], NULL, 10), strtoull(argv[3], NULL, 10));
    if (argc != 4 || strcmp(argv[1], "daemon") != 0) {
        fprintf(stderr, "usage: memcheck daemon MIB SEED | memcheck dirty MIB RATE_MB_S\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[2], NULL, 10);
    uint64_t seed = strtoull(argv[3], NULL, 10);
    uint64_t pages = mib * 1024 * 1024 / PAGE;
    uint64_t words = PAGE / sizeof(uint64_t);
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        write_result("{\"state\":\"error\",\"error\":\"mmap failed\"}\n");
        return 1;
    }
    for (uint64_t p = 0; p < pages; p++)
        for (uint64_t w = 0; w < words; w++)
            mem[p * words + w] = word_for(seed, p, w);

    char buf[256];
    snprintf(buf, sizeof buf,
             "{\"state\":\"filled\",\"pages\":%llu,\"seed\":%llu,\"verifications\":0}\n",
             (unsigned long long)pages, (unsigned long long)seed);
    write_result(buf);

    /* SIGUSR1 is taken only inside sigsuspend: with pause() a request that came while a
       verification ran set the flag just before the wait and was never seen (the agent then
       waited its 120 s for nothing). */
    sigset_t usr1, waiting;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waiting);
    sigdelset(&waiting, SIGUSR1);
    signal(SIGUSR1, on_usr1);
    unsigned long long verifications = 0;
    for (;;) {
        while (!verify_requested)
            sigsuspend(&waiting);
        verify_requested = 0;
        uint64_t bad = 0, first_bad = UINT64_MAX;
        for (uint64_t p = 0; p < pages; p++) {
            for (uint64_t w = 0; w < words; w++) {
                if (mem[p * words + w] != word_for(seed, p, w)) {
                    bad++;
                    if (first_bad == UINT64_MAX) first_bad = p;
                    break;
                }
            }
        }
        verifications++;
        snprintf(buf, sizeof buf,
                 "{\"state\":\"verified\",\"pages\":%llu,\"bad_pages\":%llu,"
                 "\"first_bad_page\":%lld,\"seed\":%llu,\"verifications\":%llu}\n",
                 (unsigned long long)pages, (unsigned long long)bad,
                 bad ? (long long)first_bad : -1LL, (unsigned long long)seed,
                 verifications);
        write_result(buf);
    }
}
