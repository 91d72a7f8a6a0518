/*
 * statusd: the demo guest's web server on port 80.
 *
 * Every answer is one JSON object: hostname, uptime and a counter that
 * advances once a second. The counter lives in this process's memory, so a
 * clone shows it continuing from the live image instead of starting over.
 *
 * One process, one poll loop, no fork per request: right after a clone
 * resumes, the guest's code must be translated anew under TCG, and the
 * fewer code paths a request takes, the sooner the first answer comes.
 * HTTP/1.1 keep-alive is supported so a client can hold one connection
 * across a migration.
 *
 * GET /work[?ms=N] is a workload whose cost is waiting, not CPU, the way an
 * I/O-bound service's is: each request is held N ms (default 50), and at most
 * WORK_SLOTS are in service at once; the rest wait in arrival order. So one
 * VM serves about WORK_SLOTS * 1000 / N of them a second, and capacity grows
 * with the number of VMs even on a host with few cores (autoscaling).
 */
#define _GNU_SOURCE /* strcasestr */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 128
#define BUF 2048
#define WORK_SLOTS 4
#define WORK_MS 50

enum { IDLE, QUEUED, WORKING };

struct conn {
    int fd;
    size_t len;
    int state;      /* a /work request: waiting for a slot, or in service */
    int keep;       /* its connection stays open after the answer */
    int ms;         /* how long it is held */
    double arrived; /* CLOCK_MONOTONIC */
    double due;
    char buf[BUF];
};

static struct conn conns[MAX_CONNS];
static unsigned long long counter, worked;

static double now(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void respond(struct conn *c, int keep_alive, int found) {
    char body[512], head[256];
    struct utsname u;
    uname(&u);
    int blen = found
        ? snprintf(body, sizeof body, "{\"hostname\":\"%s\",\"uptime\":%.2f,\"counter\":%llu}\n",
                   u.nodename, now(CLOCK_BOOTTIME), counter)
        : snprintf(body, sizeof body, "{\"error\":\"not found\"}\n");
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        "Connection: %s\r\n\r\n",
                        found ? "200 OK" : "404 Not Found", blen, keep_alive ? "keep-alive" : "close");
    struct iovec iov[2] = {{head, (size_t)hlen}, {body, (size_t)blen}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    sendmsg(c->fd, &msg, MSG_NOSIGNAL);
}

static void respond_work(struct conn *c, double t, int in_service) {
    char body[256], head[256];
    struct utsname u;
    uname(&u);
    int blen = snprintf(body, sizeof body,
                        "{\"hostname\":\"%s\",\"worked_ms\":%d,\"queued_ms\":%.1f,\"in_service\":%d,\"served\":%llu}\n",
                        u.nodename, c->ms, (t - c->arrived) * 1000 - c->ms, in_service, ++worked);
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        "Connection: %s\r\n\r\n", blen, c->keep ? "keep-alive" : "close");
    struct iovec iov[2] = {{head, (size_t)hlen}, {body, (size_t)blen}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    sendmsg(c->fd, &msg, MSG_NOSIGNAL);
}

static void drop(struct conn *c) {
    close(c->fd);
    c->fd = -1;
    c->len = 0;
    c->state = IDLE;
}

/* Answer every complete request in the buffer, up to a /work one, which is
   queued (the rest waits until it is answered); returns 0 if the connection closes. */
static int serve(struct conn *c) {
    char *end;
    while (c->state == IDLE && (end = strstr(c->buf, "\r\n\r\n")) != NULL) {
        *end = '\0';
        int http11 = strstr(c->buf, "HTTP/1.1") != NULL;
        int close_req = strcasestr(c->buf, "connection: close") != NULL;
        int keep = strcasestr(c->buf, "connection: keep-alive") != NULL || (http11 && !close_req);
        int work = strncmp(c->buf, "GET /work ", 10) == 0 || strncmp(c->buf, "GET /work?", 10) == 0;
        int found = work || strncmp(c->buf, "GET / ", 6) == 0 || strncmp(c->buf, "GET /status.json ", 17) == 0 ||
                    strncmp(c->buf, "HEAD / ", 7) == 0;
        if (work) {
            const char *line_end = strstr(c->buf, "\r\n"), *ms = strstr(c->buf, "ms=");
            int v = ms && (!line_end || ms < line_end) ? atoi(ms + 3) : WORK_MS; /* in the request line only */
            c->ms = v < 1 ? 1 : v > 10000 ? 10000 : v;
            c->keep = keep;
            c->state = QUEUED;
            c->arrived = now(CLOCK_MONOTONIC);
        } else {
            respond(c, keep, found);
        }
        size_t used = (size_t)(end + 4 - c->buf);
        memmove(c->buf, end + 4, c->len - used + 1);
        c->len -= used;
        if (!work && !keep) return 0;
    }
    return c->len < BUF - 1;
}

/* Start queued /work requests in arrival order while slots are free, and answer
   those whose time is up; returns the earliest time one is due (0: none). */
static double schedule(double t) {
    int busy = 0; /* in service: each answer says how many were, itself included */
    for (int i = 0; i < MAX_CONNS; i++) busy += conns[i].fd >= 0 && conns[i].state == WORKING;
    for (int i = 0; i < MAX_CONNS; i++) {
        struct conn *c = &conns[i];
        if (c->fd < 0 || c->state != WORKING || t < c->due) continue;
        respond_work(c, t, busy--);
        c->state = IDLE;
        if (!c->keep || !serve(c)) drop(c);
    }
    while (busy < WORK_SLOTS) {
        struct conn *first = NULL;
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].fd >= 0 && conns[i].state == QUEUED && (!first || conns[i].arrived < first->arrived)) first = &conns[i];
        if (!first) break;
        first->state = WORKING;
        first->due = t + first->ms / 1000.0;
        busy++;
    }
    double earliest = 0;
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].fd >= 0 && conns[i].state == WORKING && (!earliest || conns[i].due < earliest)) earliest = conns[i].due;
    return earliest;
}

int main(void) {
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(80)};
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 128)) {
        perror("statusd: bind/listen");
        return 1;
    }
    for (int i = 0; i < MAX_CONNS; i++) conns[i].fd = -1;
    double next_tick = now(CLOCK_MONOTONIC) + 1.0;
    counter = 1;
    struct pollfd pfd[MAX_CONNS + 1];
    double due = 0;
    for (;;) {
        int n = 0;
        pfd[n++] = (struct pollfd){.fd = ls, .events = POLLIN};
        for (int i = 0; i < MAX_CONNS; i++)  /* a connection whose /work request waits is not read meanwhile */
            pfd[n++] = (struct pollfd){.fd = conns[i].fd, .events = conns[i].state == IDLE ? POLLIN : 0};
        double wake = due && due < next_tick ? due : next_tick;
        int wait_ms = (int)((wake - now(CLOCK_MONOTONIC)) * 1000) + 1;
        poll(pfd, n, wait_ms > 0 ? wait_ms : 0);
        double t = now(CLOCK_MONOTONIC);
        while (t >= next_tick) {
            counter++;
            next_tick += 1.0;
        }
        if (pfd[0].revents & POLLIN) {
            int fd = accept(ls, NULL, NULL);
            if (fd >= 0) {
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                int slot = -1;
                for (int i = 0; i < MAX_CONNS && slot < 0; i++)
                    if (conns[i].fd < 0) slot = i;
                if (slot < 0) close(fd);
                else conns[slot] = (struct conn){.fd = fd, .len = 0};
            }
        }
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = &conns[i];
            if (c->fd < 0 || !(pfd[i + 1].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t got = read(c->fd, c->buf + c->len, BUF - 1 - c->len);
            if (got <= 0) {
                if (got < 0 && errno == EINTR) continue;
                drop(c);
                continue;
            }
            c->len += (size_t)got;
            c->buf[c->len] = '\0';
            if (!serve(c)) drop(c);
        }
        due = schedule(now(CLOCK_MONOTONIC));
    }
}
