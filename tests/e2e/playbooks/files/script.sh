#!/bin/sh
echo "script ran with $1 in $(pwd)"
