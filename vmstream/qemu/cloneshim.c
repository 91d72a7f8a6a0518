/*
 * Preloaded into clone QEMUs (LD_PRELOAD). Two things QEMU does to a guest's RAM
 * are wrong when that RAM is a MAP_PRIVATE mapping of an image's memfs file.
 *
 * 1. madvise(MADV_HUGEPAGE) becomes madvise(MADV_NOHUGEPAGE) (unless
 *    VMSTREAM_NOTHP=0). QEMU marks every RAM block and its TCG code buffer
 *    MADV_HUGEPAGE. For a clone that costs twice:
 *     - the kernel's mmap fault path then reads 4 MiB (two PMD-sized folios)
 *       around every missing page of the file, so an idle clone pulls ~4x the
 *       pages it touches;
 *     - the TCG code buffer becomes transparent huge pages, ~20 MiB private per
 *       clone for a few MiB of translated code.
 *    Clone RAM is a private file mapping, which never gets huge pages anyway.
 *
 * 2. fallocate(PUNCH_HOLE) on a FUSE file (the image's memory on memfs) succeeds
 *    without touching it. QEMU discards guest RAM that the balloon took or that
 *    the guest reported free by punching a hole in the RAM's file and then
 *    madvise(MADV_DONTNEED) on the mapping, and gives up if the punch fails
 *    (memfs has no fallocate). For a clone the punch is wrong anyway: the file
 *    is the image, shared by every clone. The DONTNEED alone is what a clone
 *    needs: it drops the clone's private copy of the page, and the image's page
 *    shows through again.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#define FUSE_SUPER_MAGIC 0x65735546

static int nothp(void)
{
    static int on = -1;
    if (on < 0) {
        const char *v = getenv("VMSTREAM_NOTHP");
        on = !(v && strcmp(v, "0") == 0);
    }
    return on;
}

int madvise(void *addr, size_t length, int advice)
{
    if (advice == MADV_HUGEPAGE && nothp())
        advice = MADV_NOHUGEPAGE;
    return (int)syscall(SYS_madvise, addr, length, advice);
}

int fallocate(int fd, int mode, off_t offset, off_t len)
{
    struct statfs st;
    if ((mode & FALLOC_FL_PUNCH_HOLE) && fstatfs(fd, &st) == 0 && st.f_type == FUSE_SUPER_MAGIC)
        return 0;
    return (int)syscall(SYS_fallocate, fd, mode, offset, len);
}

int fallocate64(int fd, int mode, off_t offset, off_t len)
{
    return fallocate(fd, mode, offset, len);
}
