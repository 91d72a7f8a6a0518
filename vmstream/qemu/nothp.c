/*
 * Preloaded into clone QEMUs (LD_PRELOAD): turns madvise(MADV_HUGEPAGE) into
 * madvise(MADV_NOHUGEPAGE).
 *
 * QEMU marks every RAM block and its TCG code buffer MADV_HUGEPAGE. For a clone
 * that costs twice:
 *  - the guest RAM is a MAP_PRIVATE mapping of a memfs file, and the kernel's
 *    mmap fault path then reads 4 MiB (two PMD-sized folios) around every
 *    missing page, so an idle clone pulls ~4x the pages it touches;
 *  - the TCG code buffer becomes transparent huge pages, ~20 MiB private per
 *    clone for a few MiB of translated code.
 * Clone RAM is a private file mapping, which never gets huge pages anyway.
 */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int madvise(void *addr, size_t length, int advice)
{
    if (advice == MADV_HUGEPAGE)
        advice = MADV_NOHUGEPAGE;
    return (int)syscall(SYS_madvise, addr, length, advice);
}
