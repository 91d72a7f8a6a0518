/*
 * vmclock: read or set the guest's wall clock with nanosecond precision.
 *
 *   vmclock get            print CLOCK_REALTIME as SECONDS.NANOSECONDS
 *   vmclock set S.N        set CLOCK_REALTIME
 *
 * A clone resumes with the clock of the moment its image was taken; the host
 * sends its own time with the clone's identity and this puts it right.
 * busybox date only sets whole seconds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
    struct timespec ts;
    if (argc == 2 && strcmp(argv[1], "get") == 0) {
        clock_gettime(CLOCK_REALTIME, &ts);
        printf("%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "set") == 0) {
        char *dot = strchr(argv[2], '.');
        ts.tv_sec = strtoll(argv[2], NULL, 10);
        ts.tv_nsec = 0;
        if (dot) {
            char frac[10] = "000000000";
            size_t n = strlen(dot + 1);
            memcpy(frac, dot + 1, n > 9 ? 9 : n);
            ts.tv_nsec = strtol(frac, NULL, 10);
        }
        if (clock_settime(CLOCK_REALTIME, &ts) != 0) {
            perror("vmclock: clock_settime");
            return 1;
        }
        return 0;
    }
    fprintf(stderr, "usage: vmclock get | vmclock set SECONDS[.NANOSECONDS]\n");
    return 2;
}
