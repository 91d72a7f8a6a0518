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
 * The agent starts the daemon ("memcheck-fill") and sends SIGUSR1
 * ("memcheck-verify"). Results are one JSON object per line.
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

int main(int argc, char **argv) {
    if (argc != 4 || strcmp(argv[1], "daemon") != 0) {
        fprintf(stderr, "usage: memcheck daemon MIB SEED\n");
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

    signal(SIGUSR1, on_usr1);
    unsigned long long verifications = 0;
    for (;;) {
        pause();
        if (!verify_requested) continue;
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
