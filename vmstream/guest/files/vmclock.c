/*
 * vmclock: read or set the guest's wall clock with nanosecond precision.
 *
 *   vmclock get            print CLOCK_REALTIME as SECONDS.NANOSECONDS
 *   vmclock set S.N        set CLOCK_REALTIME
 *   vmclock step [+-]S.N   step CLOCK_REALTIME by that many seconds (the
 *                          kernel adds it: no time lost between read and set)
 *
 * A clone resumes with the clock of the moment its image was taken; the host
 * sends its own time with the clone's identity and this puts it right.
 * busybox date only sets whole seconds.
 */
#define _GNU_SOURCE /* clock_adjtime */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timex.h>
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
    if (argc == 3 && strcmp(argv[1], "step") == 0) {
        const char *text = argv[2];
        int negative = *text == '-';
        if (*text == '-' || *text == '+') text++;
        char *end;
        long long ns = strtoll(text, &end, 10) * 1000000000LL;
        if (*end == '.') {
            long scale = 100000000;
            for (const char *p = end + 1; *p >= '0' && *p <= '9' && scale > 0; p++, scale /= 10) ns += (*p - '0') * scale;
        }
        if (negative) ns = -ns;
        struct timex tx = {.modes = ADJ_SETOFFSET | ADJ_NANO};
        tx.time.tv_sec = (time_t)(ns / 1000000000LL);
        tx.time.tv_usec = (long)(ns % 1000000000LL);
        if (tx.time.tv_usec < 0) {
            tx.time.tv_sec -= 1;
            tx.time.tv_usec += 1000000000L;
        }
        if (clock_adjtime(CLOCK_REALTIME, &tx) < 0) {
            perror("vmclock: clock_adjtime");
            return 1;
        }
        return 0;
    }
    fprintf(stderr, "usage: vmclock get | vmclock set SECONDS[.NANOSECONDS] | vmclock step [+-]SECONDS[.NANOSECONDS]\n");
    return 2;
}
